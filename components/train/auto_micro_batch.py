"""`step.micro_batch_size="auto"`: the largest micro-batch whose step fits the memory.

The batch is grown until memory is full (the source article's §6.1), without growing the
step: the global batch stays `batch_size`, kept by gradient accumulation. Candidates are the
divisors of each process's share of the batch, largest first. Before the weights exist the
`--dry-run` planner (`memory_model`, `activation_memory`) predicts each candidate's peak; the
largest predicted to fit the budget (`memory_budget`) is then confirmed by a trial step
(`trial_step`), backing off to the next smaller candidate when the trial runs out of memory or
measures more than the budget. Every process agrees on the smallest choice of any (each
process's trials are collectives under data parallelism, so they run in lockstep).

Pipeline parallelism is refused: its schedule re-splits the trainer's micro-batches into its
own (`n_microbatches`), so the micro-batch is the schedule's to size, not the trainer's.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from tessera.components.interfaces import DryRunError, OptimizerFactory, ParallelPlan, PrecisionPolicy, TrainingData
from tessera.components.moe.experts import ROW_MULTIPLE
from tessera.components.optim.state_size import state_tensors
from tessera.components.parallel.layout import Layout
from tessera.components.parallel.mesh import MeshError
from tessera.components.train import activation_memory, memory_model
from tessera.components.train.live_bytes import held_bytes
from tessera.components.train.memory_budget import device_budget, parse_size
from tessera.components.train.trial_step import trial_peak


@dataclasses.dataclass(frozen=True, kw_only=True)
class Planned:
    """What is known before the weights exist. `predicted`: micro-batch -> planned peak bytes
    (empty when the planner cannot size this run: `why_unplanned` says why); `optimizer`:
    the optimizer state's bytes, which the first update allocates (the trial never does)."""

    budget: int
    budget_source: str
    predicted: dict[int, float]
    optimizer: float | None
    why_unplanned: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
    """The micro-batch chosen and `note`, the run's line that says why."""

    size: int
    note: str


def plan(model: nn.Module, *, parallel: ParallelPlan, precision: PrecisionPolicy, optimizer: OptimizerFactory,
         batch_size: int, seq_len: int, device: str, checkpointing: str, memory_limit: str | int | None) -> Planned:
    """The budget and the candidates' predicted peaks, from the largest down to the first
    that fits, for `model` still unapplied (on the meta device for a prediction) and the state
    `optimizer` keeps (`state_size`). A MeshError (the command line's one-line fault) refuses
    pipeline parallelism."""
    held = held_bytes([*model.parameters(), *model.buffers()])
    if memory_limit is not None:
        budget, source = parse_size(memory_limit), "step.memory_limit"
    else:
        budget, source = device_budget(device, held=held)

    def unplanned(why: str) -> Planned:
        return Planned(budget=budget, budget_source=source, predicted={}, optimizer=None, why_unplanned=why)

    try:
        layout = parallel.layout(model, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except (DryRunError, ValueError) as err:
        return unplanned(f"the planner cannot lay this plan out: {err}")
    if layout.pp > 1:
        raise MeshError(f"step.micro_batch_size=auto cannot size a pipeline (pp={layout.pp}): its schedule re-splits "
                        f"each step into its own micro-batches; set step.micro_batch_size (and parallel.n_microbatches)"
                        f" by hand, using --dry-run's memory plan to choose")
    if any(not p.is_meta for p in model.parameters()):
        return unplanned("the model arrived with its weights, and the planner measures on the meta device")
    try:
        predicted, optimizer_bytes = _predict(model, layout, precision, batch_size // layout.dp, budget=budget,
                                              seq_len=seq_len, device=device, checkpointing=checkpointing,
                                              optimizer_states=state_tensors(optimizer, model))
    except DryRunError as err:
        return unplanned(f"the planner cannot size this model: {err}")
    return Planned(budget=budget, budget_source=source, predicted=predicted, optimizer=optimizer_bytes)


def _predict(model: nn.Module, layout: Layout, precision: PrecisionPolicy, share: int, *, budget: int, seq_len: int,
             device: str, checkpointing: str, optimizer_states: dict[int, float]) -> tuple[dict[int, float], float]:
    """Planned peaks (as `--dry-run` plans one) from the largest candidate down to the first
    within `budget` (each is a meta pass: smaller ones are planned only if needed), and the
    optimizer state's bytes."""
    fused = torch.device(device).type != "cpu"  # GPU attention is fused; CPU experts pad rows
    element = precision.element_bytes(torch.device(device).type)
    predicted, optimizer = {}, 0.0
    for micro in candidates(share):
        acts = activation_memory.measure(model, micro_batch=micro, seq_len=seq_len, ep=layout.ep,
                                         row_multiple=1 if fused else ROW_MULTIPLE)
        step = memory_model.StepShape(n_micro=share // micro, tokens=micro * seq_len, checkpointing=checkpointing,
                                      fused_attention=fused, vocab_size=getattr(model, "vocab_size", None),
                                      optimizer_states=optimizer_states)
        peak = memory_model.peak_memory(model, layout, element, acts, step=step)
        predicted[micro], optimizer = peak.total, peak.optimizer
        if peak.total <= budget:
            break
    return predicted, optimizer


def candidates(share: int) -> list[int]:
    """The divisors of `share` (sequences per process per step), largest first."""
    return [m for m in range(share, 0, -1) if share % m == 0]


def choose(planned: Planned, model: nn.Module, *, parallel: ParallelPlan, precision: PrecisionPolicy,
           optimizer: OptimizerFactory, data: TrainingData, share: int, seq_len: int, device: str) -> Choice:
    """Confirm by trial steps, from the largest candidate predicted to fit down, the largest
    whose measured peak fits `planned.budget` (the same on every process), counting the state
    `optimizer` will keep. Raises MemoryError, naming the switches that lower the peak, when
    not even one sequence fits."""
    sizes = candidates(share)
    fitting = [m for m in sizes if planned.predicted.get(m, 0.0) <= planned.budget]
    if planned.optimizer is not None:
        optimizer_bytes = planned.optimizer
    else:  # unplanned: each parameter's state tensors times what this process holds of it (under
        # ZeRO-1, which holds whole parameters and steps a share of them, an overcount)
        per_parameter = state_tensors(optimizer, model)
        optimizer_bytes = sum(per_parameter.get(id(p), 0.0) * held_bytes([p]) for p in model.parameters())
    measured: dict[int, float | None] = {}
    elsewhere: set[int] = set()  # fit here, not on another process
    start = _agree_min(fitting[0] if fitting else sizes[-1])
    for micro in (m for m in sizes if m <= start):
        peak = trial_peak(model, parallel=parallel, precision=precision, data=data, micro=micro,
                          n_micro=share // micro, seq_len=seq_len, device=device)
        measured[micro] = None if peak is None else peak + optimizer_bytes
        fits_here = measured[micro] is not None and measured[micro] <= planned.budget
        if _agree_all(fits_here):
            return Choice(size=micro, note=_note(planned, share, micro, measured, elsewhere))
        if fits_here:
            elsewhere.add(micro)
    tried = _tried(planned, measured, sizes, elsewhere)
    raise MemoryError(f"step.micro_batch_size=auto: not even 1 sequence per micro-batch fits the "
                      f"{_gb(planned.budget)} budget ({planned.budget_source}; {tried}). Raise step.memory_limit if "
                      f"it is set, or lower the peak: compute.activation_checkpointing=full, a smaller seq_len, "
                      f"precision=@bf16, a sharding parallel plan across more processes")


def _agree_min(value: int) -> int:
    """The smallest `value` over the processes of the run (itself outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)  # a CPU tensor: gloo serves it beside NCCL
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def _agree_all(ok: bool) -> bool:
    """Whether `ok` holds on every process."""
    return bool(_agree_min(int(ok)))


def _note(planned: Planned, share: int, micro: int, measured: dict[int, float | None], elsewhere: set[int]) -> str:
    """e.g. `micro-batch auto: 8 of 16 sequences per process, 2 accumulated per step
    (predicted 3.1 GB, measured 3.0 GB of a 4.0 GB budget from step.memory_limit; 16
    predicted 6.2 GB)`."""
    predicted = planned.predicted.get(micro)
    shown = f"predicted {_gb(predicted)}, " if predicted is not None else ""
    larger = [m for m in candidates(share) if m > micro]
    rest = f"; {_tried(planned, measured, larger, elsewhere)}" if larger else ""
    why = f"; unplanned: {planned.why_unplanned}" if planned.why_unplanned else ""
    return (f"micro-batch auto: {micro} of {share} sequences per process, {share // micro} accumulated per step "
            f"({shown}measured {_gb(measured[micro])} of a {_gb(planned.budget)} budget from "
            f"{planned.budget_source}{rest}{why})")


def _tried(planned: Planned, measured: dict[int, float | None], sizes: list[int], elsewhere: set[int]) -> str:
    """What ruled each of `sizes` out: its prediction, its trial's peak or its out-of-memory
    (here, or on another process when it fit here: `elsewhere`)."""
    parts = []
    for m in sizes:
        said = [f"predicted {_gb(planned.predicted[m])}"] if m in planned.predicted else []
        if m in measured:
            said.append("out of memory in its trial" if measured[m] is None else f"measured {_gb(measured[m])}")
        if m in elsewhere:
            said.append("too large on another process")
        parts.append(f"{m} {', '.join(said) or 'not tried'}")
    return "; ".join(parts)


def _gb(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
