"""The training loop: seed, lay out and initialise the model, then step the optimizer.

A recipe preset is `fdl.Partial(train, model=..., data=..., ...)`. The model arrives built
on the meta device (see `tessera.components.train.launch`), so the parallel plan sees it before
any weight exists; here it is materialised on the CPU and initialised from `seed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console

from tessera.components.attention import rules
from tessera.components.interfaces import (
    BytesPerToken,
    OptimizerFactory,
    ParallelPlan,
    PrecisionPolicy,
    PreparedData,
    ReportsExpertLoad,
    Schedule,
    SecondOrderOptimizer,
    ShardedData,
    TrainingData,
)
from tessera.components.model.decoder import DecoderLM, cross_entropy
from tessera.components.model.stats import training_flops_per_token
from tessera.components.optim.param_groups import decay_groups
from tessera.components.parallel.process_group import world
from tessera.components.parallel.single import SingleProcess
from tessera.components.precision import auto
from tessera.components.precision.master_weights import MasterWeights
from tessera.components.train.batch_ramp import BatchRamp
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.divergence import divergence_message, first_nonfinite_weight
from tessera.components.train.guard import StabilityGuard, TrainingDiverged
from tessera.components.train.metrics import Metrics, moe_layer_indices
from tessera.components.train.preemption import RunInterrupted, StopRequest
from tessera.components.train.progress import TrainProgress
from tessera.components.train.recovery import after_rejected_step
from tessera.components.train.report import StepReporter
from tessera.components.train.run_state import RunState, restore, snapshot
from tessera.components.train.step import StepRunner
from tessera.registry.invariants import invariant


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
    # Counted on the whole model, before a plan splits it into stages or shards.
    model_flops_per_token = training_flops_per_token(model, seq_len)
    moe_layers = moe_layer_indices(model, ReportsExpertLoad)
    model = parallel.apply(model, precision=precision, device=device)
    rank, world_size = world()
    dp_size = parallel.data_parallel.size  # processes reading different data (tp / pp groups share theirs)
    if isinstance(data, ShardedData):
        data.read_share(parallel.data_parallel)
    eval_every = metrics.eval_every if metrics is not None else 0  # every rank validates (collectives)
    if not parallel.is_main_process:  # one process reports and writes files
        metrics, progress = None, False
    if progress:
        Console().print(f"precision: {precision_note}", highlight=False, soft_wrap=True)
    micro = micro_batch_size or max(1, batch_size // dp_size)  # sequences per forward on each rank
    if batch_size % (micro * dp_size):
        raise ValueError(f"batch_size={batch_size} is not a whole number of micro-batches of {micro} sequences on "
                         f"each of {dp_size} data-parallel processes; choose batch_size a multiple of "
                         f"micro_batch_size x data-parallel processes ({micro * dp_size})")
    if world_size > 1 and isinstance(data, PreparedData):
        _prepare_once(data, rank)
    if any(p.is_meta for p in model.parameters()):
        parallel.materialize(model, device)
    model = precision.prepare(model)
    for block in model.blocks():
        if activation_checkpointing != "none":
            block.checkpoint_activations = True if activation_checkpointing == "full" else "attention"
        if compile:  # static shapes: a micro-batch keeps its shape all run (MTP's T-1 is one more graph)
            block.compile(dynamic=False, **({} if compile is True else {"backend": compile}))
    parallel.ready(model)
    raw_optimizer = optimizer(decay_groups(model, decay_embeddings=decay_embeddings,
                                           decay_vectors=decay_norms_and_biases))
    opt = precision.wrap_optimizer(parallel.wrap_optimizer(raw_optimizer))
    if isinstance(raw_optimizer, SecondOrderOptimizer) and (isinstance(opt, MasterWeights) or world_size > 1):
        raise ValueError("optimizer: this optimizer differentiates the gradients a second time (Hessian-vector "
                         "products), which sharded data-parallel gradients and bf16_params' fp32 master copies do "
                         "not carry; use it with parallel=@single and precision=@fp32 or @bf16, or use "
                         "optimizer=@sophia (its Gauss-Newton-Bartlett estimate needs no second derivative)")
    runner = StepRunner(model=model, optimizer=opt, raw_optimizer=raw_optimizer, parallel=parallel,
                        precision=precision, data=data, scheduler=scheduler, scheduled=scheduled or {},
                        batch_ramp=batch_ramp, guard=guard, grad_clip=grad_clip, batch_size=batch_size, micro=micro,
                        seq_len=seq_len, world_size=dp_size, device=device)
    state = RunState(generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    model.train()
    resumed = _restore_or_start_fresh(checkpoint, state, runner=runner, data=data, progress=progress)
    if metrics is not None:
        metrics.start(dtype=precision.compute_dtype, device=device, resume=resumed, devices=world_size,
                      moe_layers=moe_layers)
    start_step = state.step
    validation: dict[str, float] | None = None
    with _explain_oom(), StopRequest() as stop, \
            TrainProgress(total_steps=steps, log_every=log_every, enabled=progress) as bar:
        reporter = StepReporter(bar=bar, metrics=metrics, model=model, seq_len=seq_len,
                                flops_per_token=model_flops_per_token / world_size,
                                layer_group=parallel.gradient_norm_group())  # pipeline stages: every layer's load
        while state.step < steps:
            step_start = time.perf_counter()
            outcome = runner.run(state)
            if guard is not None and not outcome.update:
                note = after_rejected_step(outcome, state=state, guard=guard, checkpoint=checkpoint, model=model,
                                           optimizer=opt, scheduler=scheduler, base_lr=runner.base_lrs[0],
                                           grad_clip=grad_clip, precision=precision)
                if note is not None and progress:
                    bar.console.print(note, highlight=False, soft_wrap=True)
            state.tokens += outcome.sequences * seq_len
            for name, value in outcome.terms.items():
                state.record(name, value)
            validation = _validation(model, data, parallel, eval_batches, micro, seq_len, precision, seed, device) \
                if eval_every and (state.step + 1) % eval_every == 0 else None
            reporter.report(step=state.step, outcome=outcome, loss=state.losses[-1], lr=opt.param_groups[0]["lr"],
                            tokens=state.tokens, seconds=time.perf_counter() - step_start, validation=validation)
            state.step += 1
            signum = stop.agreed(device)
            # never make a bad streak (or a rolled-back step) the rollback point
            healthy = guard is None or outcome.update
            saved = None
            if checkpoint is not None and (signum or healthy and (state.step % checkpoint.every == 0
                                                                  or state.step == steps)):
                saved = checkpoint.save(state.step, model=model, optimizer=opt,
                                        extra=snapshot(state, scaler=runner.scaler, guard=guard, data=data))
            if signum:
                if checkpoint is not None:
                    checkpoint.wait()
                raise RunInterrupted(_interrupted_message(signum, state.step, steps, saved), signum=signum)
        tokens_per_second = bar.tokens_per_second
    if checkpoint is not None:
        checkpoint.wait()
    losses = state.losses
    validated_at_end = start_step < steps and validation is not None  # the last step just validated
    if not validated_at_end:
        validation = _validation(model, data, parallel, eval_batches, micro, seq_len, precision, seed, device)
    val_loss = validation["val_loss"]
    if not math.isfinite(val_loss):  # with the guard off, or a model finite in training but not in eval
        raise TrainingDiverged(divergence_message(
            step=steps, reason=f"the final validation loss is {val_loss} (last training loss "
            f"{losses[-1] if losses else float('nan'):.4g})", terms={}, first_bad_grad=None,
            first_bad_weight=first_nonfinite_weight(model), stopped_because="the run is over and its model is unusable",
            lr=runner.base_lrs[0], warmup_steps=getattr(scheduler, "warmup_steps", None), grad_clip=grad_clip,
            compute_dtype=precision.compute_dtype))
    seconds = time.perf_counter() - start
    if metrics is not None:
        if not validated_at_end:
            metrics.log(steps, {"loss": losses[-1] if losses else None, **validation})
        mfus = [r["mfu"] for r in metrics.rows if r.get("mfu") is not None]
        history = state.history
        metrics.finish(seconds=seconds, tokens=state.tokens, console=bar.console if progress else None, extra={
            "precision": precision_note, "final_loss": losses[-1] if losses else None, **validation,
            "mean_mfu": sum(mfus) / max(1, len(mfus)),
            "skipped_steps": len(history.get("skipped_guard", [])) + len(history.get("skipped_overflow", [])),
            "rollbacks": len(history.get("rollbacks", []))})
    if progress:
        bar.console.print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} (val {val_loss:.4f}) in {steps} steps, "
                          f"{seconds:.1f} s, {tokens_per_second:,.0f} tok/s", highlight=False)
    return TrainResult(losses=list(losses), terms=state.history, model=model, val_loss=val_loss,
                       tokens_per_second=tokens_per_second, seconds=seconds)


def _restore_or_start_fresh(checkpoint: Checkpointer | None, state: RunState, *, runner: StepRunner,
                            data: TrainingData, progress: bool) -> bool:
    """Resume from the checkpoint `checkpoint.resume` asks for (True), or start fresh, moving
    an earlier run's checkpoints aside rather than mixing them with this run's (False)."""
    if checkpoint is None:
        return False
    resume_from = checkpoint.resume_path()
    if resume_from is None:
        moved = checkpoint.set_aside_previous()
        if moved is not None and progress:
            Console().print(f"note: a fresh run: the earlier run's checkpoints are now in {moved}", highlight=False,
                            soft_wrap=True)
        return False
    restore(checkpoint, resume_from, model=runner.model, optimizer=runner.optimizer, state=state,
            scaler=runner.scaler, guard=runner.guard, data=data)
    if progress:
        Console().print(f"resuming from {resume_from} (step {state.step}, {state.tokens:,} tokens)", highlight=False,
                        soft_wrap=True)
    return True


def _interrupted_message(signum: int, step: int, steps: int, saved: Path | None) -> str:
    name = signal.Signals(signum).name
    if saved is None:
        return (f"stopped by {name} after step {step} of {steps}; this run writes no checkpoints (set `checkpoint`), "
                f"so its progress is not saved")
    return f"stopped by {name} after step {step} of {steps}; checkpoint written to {saved}; continue with --resume"


@torch.no_grad()
def evaluate(model: DecoderLM, data: TrainingData, *, batches: int, batch_size: int, seq_len: int,
             precision: PrecisionPolicy, seed: int, device: str = "cpu") -> float:
    """Mean next-token cross-entropy on `batches` validation batches (a fixed sample per seed)."""
    sample = _validation_sample(data, batches=batches, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return _mean_loss(model, sample, precision=precision, device=device)


def _validation_sample(data: TrainingData, *, batches: int, batch_size: int, seq_len: int,
                       seed: int) -> list[dict[str, torch.Tensor]]:
    """The validation batches a seed fixes: the same sample for `evaluate` and the run's report."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [data.batch("val", batch_size=batch_size, seq_len=seq_len, generator=generator) for _ in range(batches)]


@torch.no_grad()
def _mean_loss(model: DecoderLM, batches: list[dict[str, torch.Tensor]], *, precision: PrecisionPolicy,
               device: str) -> float:
    """Mean next-token cross-entropy of `model` (in eval mode) over `batches`."""
    model.eval()
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision.autocast(torch.device(device).type):
            logits = model(batch["tokens"], doc_ids=batch["doc_ids"])
        total += cross_entropy(logits, batch["targets"]).item()
    model.train()
    return total / max(1, len(batches))


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


def _validation(model: DecoderLM, data: TrainingData, parallel: ParallelPlan, batches: int, batch_size: int,
                seq_len: int, precision: PrecisionPolicy, seed: int, device: str) -> dict[str, float]:
    """Validation loss (nats/token, averaged over the data-parallel processes) and bits per
    byte (when the data knows its bytes per token)."""
    sample = _validation_sample(data, batches=batches, batch_size=batch_size, seq_len=seq_len, seed=seed)
    model.eval()
    loss = parallel.validation_loss(model, sample)
    model.train()
    if loss is None:
        loss = _mean_loss(model, sample, precision=precision, device=device)
    out = parallel.mean_over_data_parallel({"val_loss": loss}, device)
    if isinstance(data, BytesPerToken):
        out["val_bpb"] = out["val_loss"] / math.log(2) / data.bytes_per_token("val")
    return out


def _prepare_once(data: PreparedData, rank: int) -> None:
    """Prepare (clean, dedup, tokenize) the data on rank 0 only; the other ranks wait for its
    cache instead of racing to write the same folder. They poll rather than wait in a
    collective, whose timeout a large corpus would outlast (if rank 0 fails, torchrun stops them)."""
    if rank == 0:
        data.prepare()
        return
    while not data.prepared():
        time.sleep(1.0)
    data.prepare()
