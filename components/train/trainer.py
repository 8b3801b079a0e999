"""The training loop: seed, lay out and initialise the model, then step the optimizer.

A recipe preset is `fdl.Partial(train, model=..., data=..., ...)`. The model arrives built
on the meta device (see `components.train.launch`), so the parallel plan sees it before
any weight exists; here it is materialised on the CPU and initialised from `seed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Literal

import torch
from rich.console import Console
from torch.nn.attention import SDPBackend, sdpa_kernel

from components.attention import rules
from components.interfaces import (
    OptimizerFactory,
    OptimizerStepHook,
    ParallelPlan,
    PrecisionPolicy,
    Schedule,
    TrainingData,
)
from components.model.decoder import DecoderLM, cross_entropy
from components.model.stats import training_flops_per_token
from components.moe.router import Router
from components.optim.param_groups import decay_groups
from components.parallel.process_group import world
from components.parallel.single import SingleProcess
from components.precision import auto
from components.precision.master_weights import MasterWeights
from components.train.batch_ramp import BatchRamp
from components.train.checkpoint import Checkpointer
from components.train.divergence import clip_gradients, divergence_message, first_nonfinite_weight
from components.train.guard import StabilityGuard, TrainingDiverged
from components.train.metrics import Metrics, moe_layer_indices
from components.train.progress import TrainProgress
from registry.invariants import invariant


@dataclasses.dataclass
class TrainResult:
    """What a run measured (per-step LM loss and every loss term, final validation loss,
    throughput) and the trained model."""

    losses: list[float]
    terms: dict[str, list[float]]
    model: torch.nn.Module
    val_loss: float
    tokens_per_second: float
    seconds: float


@invariant("steps > 0 and batch_size > 0 and seq_len > 0",
           lambda steps, batch_size, seq_len: steps > 0 and batch_size > 0 and seq_len > 0,
           fix="use positive steps, batch_size and seq_len")
@invariant("data.vocab_size <= model.vocab_size", lambda data, model: data.vocab_size <= model.vocab_size,
           fix="give the model at least as many token ids as the data's tokenizer (model.vocab_size)")
@invariant(**rules.WINDOW_FITS_SEQUENCE)
@invariant(**rules.SEQUENCE_FILLS_BLOCKS)
@invariant("grad_clip is None or grad_clip > 0", lambda grad_clip: grad_clip is None or grad_clip > 0,
           fix="set grad_clip to a positive max norm, or None to disable clipping")
@invariant("micro_batch_size divides batch_size",
           lambda batch_size, micro_batch_size: micro_batch_size is None or batch_size % micro_batch_size == 0,
           fix="choose a micro_batch_size that divides batch_size")
def train(*, model: DecoderLM, data: TrainingData, optimizer: OptimizerFactory, scheduler: Schedule,
          parallel: ParallelPlan | None = None, steps: int, batch_size: int, seq_len: int,
          micro_batch_size: int | None = None,
          batch_ramp: BatchRamp | None = None, scheduled: dict[str, Schedule] | None = None,
          checkpoint: Checkpointer | None = None, guard: StabilityGuard | None = None, metrics: Metrics | None = None,
          precision: PrecisionPolicy | None = None,
          activation_checkpointing: Literal["none", "full", "selective"] = "none",
          compile: bool | str = False, grad_clip: float | None = 1.0, decay_embeddings: bool = False,
          decay_norms_and_biases: bool = False,
          device: str = "cpu", seed: int = 0,
          eval_batches: int = 8, threads: int | None = None, log_every: int = 25, progress: bool = True) -> TrainResult:
    """Train `model` for `steps` optimizer steps on next-token prediction.

    Args:
        model: the language model (on the meta device or already materialised).
        data: where batches come from.
        optimizer: a built `OPTIMIZER` partial, called with the parameter groups.
        scheduler: learning-rate multiplier per step.
        parallel: the parallel plan applied before materialisation (default: one process).
        steps, batch_size, seq_len: run length and sequences per optimizer step of seq_len tokens.
        micro_batch_size: sequences per forward/backward on each process; a step accumulates
            batch_size / (micro_batch_size x processes) of them (default: each process's whole
            share at once). `batch_size` is global: N data-parallel processes train on 1/N each.
        batch_ramp: grow the sequences per step from a smaller start (V2/V3).
        checkpoint: when and where to save, and whether to resume (exactly: weights, optimizer,
            RNG and data-loader positions, step and token counters, loss history).
        guard: skip non-finite or spiking steps, roll back after repeated ones, and raise
            `TrainingDiverged` (naming the step, what went non-finite and what to try) when the
            run cannot recover (None: off; a run that ends with a non-finite validation loss
            raises it all the same).
        metrics: JSONL/TensorBoard logging, MFU, MoE load, periodic validation, summary, plots.
        precision: the numeric policy (default `auto`: bf16 autocast where the device runs bf16
            matmuls faster than fp32, fp32 elsewhere; said in the run's first line).
        activation_checkpointing: recompute every block ("full") or every attention sublayer
            ("selective") in the backward pass instead of storing activations.
        compile: torch.compile each block (first steps compile; 1.1-1.8x faster after); a string
            names the backend instead of inductor (e.g. "aot_eager": tracing only, quick to check).
        scheduled: attribute name -> schedule of its value, set before every step on each
            module of the model that has the attribute (e.g. "mtp_loss_weight",
            "bias_update_speed").
        grad_clip: max global gradient norm (pre-clip norm is reported), None to disable.
        decay_embeddings, decay_norms_and_biases: apply the optimizer's weight decay to the
            embeddings and output head / to norm weights and biases too (off by default).
        device: where the model is materialised and batches go ("cpu", "cuda", ...).
        seed: seeds weights and batch sampling; the same seed gives the same run.
        eval_batches: validation batches averaged at the end.
        threads: torch intra-op threads (None leaves torch's default).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    precision, precision_note = auto.resolve(precision or auto.Auto(), device)
    parallel = parallel if parallel is not None else SingleProcess()
    model = parallel.apply(model, precision=precision, device=device)
    rank, world_size = world()
    eval_every = metrics.eval_every if metrics is not None else 0  # every rank validates (collectives)
    if not parallel.is_main_process:  # one process reports and writes files
        metrics, progress = None, False
    if progress:
        Console().print(f"precision: {precision_note}", highlight=False, soft_wrap=True)
    micro = micro_batch_size or max(1, batch_size // world_size)  # sequences per forward on each rank
    if batch_size % (micro * world_size):
        raise ValueError(f"batch_size={batch_size} is not a whole number of micro-batches of {micro} sequences on "
                         f"each of {world_size} processes; choose batch_size a multiple of "
                         f"micro_batch_size x processes ({micro * world_size})")
    if world_size > 1 and hasattr(data, "prepared"):
        _prepare_once(data, rank)
    if any(p.is_meta for p in model.parameters()):
        parallel.materialize(model, device)
    model = precision.prepare(model)
    for layer in list(model.layers) + [m.block for m in getattr(model, "mtp", [])]:
        if activation_checkpointing != "none":
            layer.checkpoint_activations = True if activation_checkpointing == "full" else "attention"
        if compile:  # static shapes: a micro-batch keeps its shape all run (MTP's T-1 is one more graph)
            layer.compile(dynamic=False, **({} if compile is True else {"backend": compile}))
    named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    step_hooks = [m for m in model.modules() if isinstance(m, OptimizerStepHook)]
    opt = precision.wrap_optimizer(optimizer(decay_groups(model, decay_embeddings=decay_embeddings,
                                                          decay_vectors=decay_norms_and_biases)))
    if hasattr(opt, "wants_second_order") and (isinstance(opt, MasterWeights) or world_size > 1):
        raise ValueError("optimizer: this optimizer differentiates the gradients a second time (Hessian-vector "
                         "products), which sharded data-parallel gradients and bf16_params' fp32 master copies do "
                         "not carry; use it with parallel=@single and precision=@fp32 or @bf16, or use "
                         "optimizer=@sophia (its Gauss-Newton-Bartlett estimate needs no second derivative)")
    base_lrs = [group["lr"] for group in opt.param_groups]
    generator = torch.Generator().manual_seed(seed)
    device_type = torch.device(device).type
    autocast = precision.autocast(device_type)
    scaler = precision.grad_scaler(device_type)
    losses: list[float] = []
    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    model.train()
    tokens_seen, start_step = 0, 0
    routers = [m for m in model.modules() if isinstance(m, Router)]
    flops_per_token = training_flops_per_token(model, seq_len) / world_size  # per device: MFU is per device
    resume_from = checkpoint.resume_path() if checkpoint is not None else None
    if checkpoint is not None and resume_from is None:
        moved = checkpoint.set_aside_previous()
        if moved is not None and progress:
            Console().print(f"note: a fresh run: the earlier run's checkpoints are now in {moved}", highlight=False,
                            soft_wrap=True)
    if resume_from is not None:
        restored = checkpoint.load(resume_from, model=model, optimizer=opt)
        extra = restored["extra"]
        start_step, tokens_seen, history = restored["step"], extra["tokens"], extra["history"]
        losses = list(history.get("lm", []))
        torch.set_rng_state(extra["rng"])
        if extra.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(extra["cuda_rng"]))
        generator.set_state(extra["data_generator"])
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if guard is not None and extra.get("guard"):
            guard.load_state_dict(extra["guard"])
        if hasattr(data, "load_state_dict"):
            data.load_state_dict(extra["data"])
    if resume_from is not None and progress:
        Console().print(f"resuming from {resume_from} (step {start_step}, {tokens_seen:,} tokens)", highlight=False,
                      soft_wrap=True)
    if metrics is not None:
        metrics.start(dtype=precision.compute_dtype, device=device, resume=resume_from is not None,
                      devices=world_size, moe_layers=moe_layer_indices(model, Router))
    validation: dict[str, float] | None = None
    with _explain_oom(), TrainProgress(total_steps=steps, log_every=log_every, enabled=progress) as bar:
        for step in range(start_step, steps):
            step_start = time.perf_counter()
            multiplier = scheduler(step, tokens_seen)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * multiplier
            for name, schedule in (scheduled or {}).items():
                _set_everywhere(model, name, schedule(step, tokens_seen))
            sequences = batch_ramp.batch_size(tokens_seen, full_batch=batch_size, micro_batch=micro * world_size) \
                if batch_ramp is not None else batch_size
            n_micro = sequences // (micro * world_size)
            step_terms: dict[str, float] = {}
            # Optimizers that differentiate the gradients (Sophia-H's Hutchinson estimate) need
            # their graph, and attention whose backward is differentiable (SDPA's math kernel).
            second_order = getattr(opt, "wants_second_order", lambda: False)()
            for _ in range(n_micro):
                batch = {k: v.to(device) for k, v in
                         data.batch("train", batch_size=micro, seq_len=seq_len, generator=generator).items()}
                with autocast, sdpa_kernel(SDPBackend.MATH) if second_order else contextlib.nullcontext():
                    terms = model.losses(batch["tokens"], batch["targets"], doc_ids=batch["doc_ids"])
                loss = torch.stack(list(terms.values())).sum() / n_micro
                (scaler.scale(loss) if scaler is not None else loss).backward(create_graph=second_order)
                for name, value in terms.items():
                    step_terms[name] = step_terms.get(name, 0.0) + value.item() / n_micro
            if world_size > 1:  # report (and let the guard judge) the loss of the whole batch, on every rank
                step_terms = _mean_over_ranks(step_terms, device)
            if scaler is not None:
                scaler.unscale_(opt)  # clip and judge the true gradients
            grad_norm, first_bad_grad = clip_gradients(named_params, grad_clip)
            overflow = scaler is not None and not math.isfinite(grad_norm.item())  # the scaler's to handle
            update = guard.check(sum(step_terms.values()), grad_norm.item()) \
                if guard is not None and not overflow else True
            if scaler is not None:
                scale_before = scaler.get_scale()
                if update:
                    scaler.step(opt)  # skips the step itself when gradients hold inf/nan
                scaler.update()
                if scaler.get_scale() < scale_before:
                    history.setdefault("skipped_overflow", []).append(step)
            elif update:
                opt.step()
            if update:
                for hook in step_hooks:
                    hook.after_optimizer_step()
            opt.zero_grad(set_to_none=True)
            if update and hasattr(opt, "update_hessian") and step % opt.hessian_interval == 0:
                _gnb_hessian(model, opt, batch, autocast)
            if guard is not None and not update:
                history.setdefault("skipped_guard", []).append(step)
                if guard.exhausted:
                    can_roll_back = checkpoint is not None and checkpoint.last is not None
                    if not (guard.may_roll_back and can_roll_back):
                        if guard.rollbacks:
                            after = f"after {guard.rollbacks} rollbacks to the last checkpoint (the most allowed)"
                        elif guard.rollback and guard.max_rollbacks > 0:
                            after = "and no checkpoint of this run to roll back to"
                        else:
                            after = "and rollback is off"
                        why = f"stopped after {guard.consecutive_bad} bad steps in a row {after}"
                        raise TrainingDiverged(divergence_message(
                            step=step + 1, reason=guard.reason, terms=step_terms, first_bad_grad=first_bad_grad,
                            first_bad_weight=first_nonfinite_weight(model), stopped_because=why,
                            lr=base_lrs[0], warmup_steps=getattr(scheduler, "warmup_steps", None),
                            grad_clip=grad_clip, compute_dtype=precision.compute_dtype))
                    # Weights and optimizer go back; the data position does not, so the offending
                    # batches are skipped rather than replayed.
                    checkpoint.load(checkpoint.last, model=model, optimizer=opt)
                    guard.rollbacks += 1
                    guard.consecutive_bad = 0
                    history.setdefault("rollbacks", []).append(step)
                    if progress:
                        bar.console.print(f"note: step {step + 1}: {guard.reason}; {guard.max_bad_steps} bad steps in "
                                          f"a row: rolled back to {checkpoint.last}", highlight=False, soft_wrap=True)
            tokens_seen += sequences * seq_len
            for name, value in step_terms.items():
                history.setdefault(name, []).append(value)
            losses.append(history["lm"][-1])
            step_tps = sequences * seq_len / (time.perf_counter() - step_start)
            load = _moe_load(routers)
            note = f"load max/mean {load['load_imbalance']:.2f}" if load else ""
            if metrics is not None:
                note = f"MFU {flops_per_token * step_tps / metrics.peak_flops:.1%}  {note}"
            bar.update(step=step, loss=losses[-1], lr=opt.param_groups[0]["lr"], tokens=sequences * seq_len,
                       grad_norm=grad_norm.item(), note=note)
            validation = _validation(model, data, eval_batches, micro, seq_len, precision, seed, device) \
                if eval_every and (step + 1) % eval_every == 0 else None
            if metrics is not None:
                row = {"loss": losses[-1], **{k: v for k, v in step_terms.items() if k != "lm"},
                       "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm.item(), "tokens": tokens_seen,
                       "tokens_per_second": step_tps, "mfu": flops_per_token * step_tps / metrics.peak_flops,
                       "skipped": int(not update), **load}
                if "expert_load" in row:  # per-layer loads as lists only when they are logged
                    row["expert_load"] = [load.tolist() for load in row["expert_load"]]
                row.update(validation or {})
                metrics.log(step + 1, row)
            healthy = guard is None or update  # never make a bad streak (or a rolled-back step) the rollback point
            if checkpoint is not None and healthy and ((step + 1) % checkpoint.every == 0 or step + 1 == steps):
                checkpoint.save(step + 1, model=model, optimizer=opt, extra={
                    "tokens": tokens_seen, "history": history, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "data_generator": generator.get_state(), "scaler": scaler.state_dict() if scaler else {},
                    "guard": guard.state_dict() if guard is not None else {},
                    "data": data.state_dict() if hasattr(data, "state_dict") else {}})
        tokens_per_second = bar.tokens_per_second
    if checkpoint is not None:
        checkpoint.wait()
    validated_at_end = start_step < steps and validation is not None  # the last step just validated
    if not validated_at_end:
        validation = _validation(model, data, eval_batches, micro, seq_len, precision, seed, device)
    val_loss = validation["val_loss"]
    if not math.isfinite(val_loss):  # with the guard off, or a model finite in training but not in eval
        raise TrainingDiverged(divergence_message(
            step=steps, reason=f"the final validation loss is {val_loss} (last training loss "
            f"{losses[-1] if losses else float('nan'):.4g})", terms={}, first_bad_grad=None,
            first_bad_weight=first_nonfinite_weight(model), stopped_because="the run is over and its model is unusable",
            lr=base_lrs[0], warmup_steps=getattr(scheduler, "warmup_steps", None), grad_clip=grad_clip,
            compute_dtype=precision.compute_dtype))
    seconds = time.perf_counter() - start
    if metrics is not None:
        if not validated_at_end:
            metrics.log(steps, {"loss": losses[-1] if losses else None, **validation})
        mfus = [r["mfu"] for r in metrics.rows if "mfu" in r]
        metrics.finish(seconds=seconds, tokens=tokens_seen, console=bar.console if progress else None, extra={
            "precision": precision_note, "final_loss": losses[-1] if losses else None, **validation,
            "mean_mfu": sum(mfus) / max(1, len(mfus)),
            "skipped_steps": len(history.get("skipped_guard", [])) + len(history.get("skipped_overflow", [])),
            "rollbacks": len(history.get("rollbacks", []))})
    if progress:
        bar.console.print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} (val {val_loss:.4f}) in {steps} steps, "
                          f"{seconds:.1f} s, {tokens_per_second:,.0f} tok/s", highlight=False)
    return TrainResult(losses=losses, terms=history, model=model, val_loss=val_loss,
                       tokens_per_second=tokens_per_second, seconds=seconds)


@torch.no_grad()
def evaluate(model: DecoderLM, data: TrainingData, *, batches: int, batch_size: int, seq_len: int,
             precision: PrecisionPolicy, seed: int, device: str = "cpu") -> float:
    """Mean next-token cross-entropy on `batches` validation batches (a fixed sample per seed)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    total = 0.0
    for _ in range(batches):
        batch = {k: v.to(device) for k, v in
                 data.batch("val", batch_size=batch_size, seq_len=seq_len, generator=generator).items()}
        with precision.autocast(torch.device(device).type):
            logits = model(batch["tokens"], doc_ids=batch["doc_ids"])
        total += cross_entropy(logits, batch["targets"]).item()
    model.train()
    return total / max(1, batches)


@contextlib.contextmanager
def _explain_oom() -> Iterator[None]:
    """Turn an allocator failure into advice naming the switches that reduce memory."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        text = str(err)
        if not (isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
                or "can't allocate memory" in text):
            raise
        raise MemoryError(
            f"the run ran out of memory ({text.splitlines()[0][:200]}). Switches that reduce it: "
            f"model.layers[*].checkpoint_activations=True (recompute activations in the backward); "
            f"micro_batch_size=<smaller> (the step keeps batch_size through gradient accumulation); a smaller "
            f"seq_len; precision=@bf16; a sharding parallel plan across more processes") from err


def _validation(model: DecoderLM, data: TrainingData, batches: int, batch_size: int, seq_len: int,
                precision: PrecisionPolicy, seed: int, device: str) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte (when the data knows its bytes per token)."""
    loss = evaluate(model, data, batches=batches, batch_size=batch_size, seq_len=seq_len,
                    precision=precision, seed=seed, device=device)
    if world()[1] > 1:
        loss = _mean_over_ranks({"loss": loss}, device)["loss"]
    out = {"val_loss": loss}
    bytes_per_token = getattr(data, "bytes_per_token", None)
    if bytes_per_token is not None:
        out["val_bpb"] = loss / math.log(2) / bytes_per_token("val")
    return out


def _mean_over_ranks(values: dict[str, float], device: str) -> dict[str, float]:
    """Each value averaged over the data-parallel processes (one all-reduce on `device`,
    where the process group's backend works)."""
    names = sorted(values)
    total = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)  # gloo has no AVG: sum, then divide
    return {n: v / world()[1] for n, v in zip(names, total.tolist())}


def _prepare_once(data: TrainingData, rank: int) -> None:
    """Prepare (clean, dedup, tokenize) the data on rank 0 only; the other ranks wait for its
    cache instead of racing to write the same folder. They poll rather than wait in a
    collective, whose timeout a large corpus would outlast (if rank 0 fails, torchrun stops them)."""
    if rank == 0:
        data.prepare()
        return
    while not data.prepared():
        time.sleep(1.0)
    data.prepare()


def _moe_load(routers: list) -> dict[str, object]:
    """Per-layer expert loads of the last step and their mean max/mean imbalance."""
    if not routers:
        return {}
    loads = [r.last_load for r in routers]  # layers may differ in expert count
    imbalance = sum((load.max() / load.mean().clamp(min=1e-9)).item() for load in loads) / len(loads)
    return {"expert_load": loads, "load_imbalance": imbalance}


def _gnb_hessian(model: DecoderLM, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], autocast) -> None:
    """Sophia's Gauss-Newton-Bartlett estimate: backprop the loss on labels sampled from the
    model's own predictions, then let the optimizer fold the squared gradients in."""
    with autocast:
        logits = model(batch["tokens"], doc_ids=batch["doc_ids"])
    sampled = torch.distributions.Categorical(logits=logits.detach().float()).sample()
    cross_entropy(logits, sampled).backward()
    opt.update_hessian(batch["tokens"].numel())  # B: tokens the mean loss averages over
    opt.zero_grad(set_to_none=True)





def _set_everywhere(model: torch.nn.Module, name: str, value: float) -> None:
    """Set attribute `name` to `value` on every module of `model` that has it."""
    found = False
    for module in model.modules():
        if hasattr(module, name) and not isinstance(getattr(module, name), (torch.Tensor, torch.nn.Module)):
            setattr(module, name, value)
            found = True
    if not found:
        raise ValueError(f"scheduled value {name!r}: no module of the model has this attribute")
