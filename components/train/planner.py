"""The memory and communication planner behind `--dry-run`: per-rank bytes of parameters,
gradients, optimizer state and activations, communication per step by collective, and the
pipeline bubble, for a model (on the meta device) under a layout of parallel degrees.

Conventions: a "rank" is one process (one GPU). The layout follows the mesh plan's degrees
(`dp_replicate` x `dp_shard` x `tp` x `pp` processes; `ep` is carved out of the data-parallel
processes, as in torchtitan): dense parameters are split by `tp` (every block linear layer,
the embedding and head vocab-parallel) and sharded by FSDP over `dp_shard`; routed experts are
split over `ep` and held whole by their owner, replicated over what of the data-parallel ranks
is left (tessera's expert parallelism: FSDP, DDP and ZeRO-1 leave them alone). Pipeline stages take
whole layers, as evenly as possible, the embedding on the first stage and the final norm, head
and MTP modules on the last (DeepSeek-V3's placement, arXiv:2412.19437 §3.2.1). The busiest
rank is reported: its parameters and its peak activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tessera.components.model import stats
from tessera.components.train import pipeline_bubble
from tessera.components.train.activation_memory import ActivationBytes

GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannedLayout:
    """Parallel degrees and pipeline schedule a run is planned for.

    dp_replicate, dp_shard, tp, pp, ep: the mesh plan's degrees (see `tessera.components.parallel.mesh`).
    zero1: optimizer state sharded over the data-parallel ranks (ZeRO-1; needs dp_shard=1).
    schedule: pipeline schedule, one of `pipeline_bubble.SCHEDULES` (used when pp > 1).
    virtual_stages: stages per rank for interleaved 1F1B.
    reshard_after_forward: FSDP frees gathered parameters after each block's forward.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero1: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"planned layout: {name}={getattr(self, name)} must be >= 1")
        if self.ep > self.dp * self.tp or (self.dp * self.tp) % self.ep:
            raise ValueError(f"planned layout: ep={self.ep} must divide the data-parallel x tensor-parallel "
                             f"ranks ({self.dp} x {self.tp}) it is carved out of")
        # the mesh plan's spelling ("1F1B", "Interleaved1F1B", "DualPipeV") names the same schedules
        spelled = {"interleaved1f1b": "interleaved_1f1b"}.get(self.schedule.lower(), self.schedule.lower())
        object.__setattr__(self, "schedule", spelled)
        if self.schedule not in pipeline_bubble.SCHEDULES:
            raise ValueError(f"planned layout: schedule={self.schedule!r}; use one of "
                             f"{', '.join(pipeline_bubble.SCHEDULES)}")

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each trains on its own share of the batch)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.schedule == "dualpipev" else (self.virtual_stages if self.schedule == "interleaved_1f1b"
                                                       else 1)

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (the data-parallel degree of routed experts)."""
        return self.dp * self.tp // self.ep

    @property
    def expert_shard(self) -> int:
        """Ranks FSDP shards each routed expert over. ep = 1: the experts are parameters of their
        block's FSDP unit like the rest, sharded over dp_shard (tensor parallelism does not
        split routed experts: every tp rank runs all of them). ep > 1: none; each expert lives
        whole on its owner and its `expert_dp` copies average their gradients
        (`tessera.components.moe.expert_parallel`), where torchtitan would FSDP-shard it further."""
        return self.dp_shard if self.ep == 1 else 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """Bytes per element: parameters (as held), gradients, each optimizer state, an fp32 master
    copy (0: none), activations (the compute dtype)."""

    param: int = 4
    grad: int = 4
    state: int = 4
    master: int = 0
    activation: int = 4


@dataclasses.dataclass(frozen=True)
class Split:
    """Parameter counts of one pipeline rank before data-parallel sharding: `dense` (split by
    tp) and `expert` (routed experts, split by ep); `root`: the dense parameters outside the
    blocks (embedding, final norm, head: FSDP's root unit); `units`: per block (main layers,
    then MTP modules), its (dense, expert) counts, each block being one FSDP unit."""

    dense: float
    expert: float
    root: float = 0.0
    units: tuple[tuple[float, float], ...] = ()


def _stage_of_layers(n_layers: int, n_stages: int) -> list[int]:
    """Stage of each layer: contiguous, as even as possible, earlier stages take the extras."""
    if n_stages > n_layers:
        raise ValueError(f"pipeline: {n_stages} stages but only {n_layers} layers; use pp x stages per rank "
                         f"<= n_layers")
    base, extra = divmod(n_layers, n_stages)
    out: list[int] = []
    for s in range(n_stages):
        out += [s] * (base + (s < extra))
    return out


def stage_owners(layout: PlannedLayout) -> list[int]:
    """Pipeline rank of each stage: looped for interleaved 1F1B, a V for DualPipeV."""
    p, v = layout.pp, layout.stages_per_rank
    if layout.schedule == "dualpipev" and p > 1:
        return list(range(p)) + list(reversed(range(p)))
    return [s % p for s in range(p * v)]


def _expert_params(module: nn.Module) -> int:
    from tessera.components.interfaces import RoutedExperts

    return sum(stats.count_parameters(m.routed_experts) for m in module.modules() if isinstance(m, RoutedExperts))


def rank_stages(model: nn.Module, layout: PlannedLayout) -> list[list[list[int]]]:
    """Per pipeline rank, the main-layer indices of each stage it holds, its stages in order."""
    n_layers = len(model.layers)
    if layout.pp == 1:
        return [[list(range(n_layers))]]
    stage = _stage_of_layers(n_layers, layout.pp * layout.stages_per_rank)
    owner = stage_owners(layout)
    return [[[i for i in range(n_layers) if stage[i] == s] for s in range(len(owner)) if owner[s] == r]
            for r in range(layout.pp)]


def rank_layers(model: nn.Module, layout: PlannedLayout) -> list[list[int]]:
    """Main-layer indices each pipeline rank holds."""
    return [[i for stage in stages for i in stage] for stages in rank_stages(model, layout)]


def split_parameters(model: nn.Module, layout: PlannedLayout) -> list[Split]:
    """Per pipeline rank: its dense and routed-expert parameter counts after tp and ep."""
    layers = rank_layers(model, layout)
    first = {id(p) for p in model.embedding.parameters()}
    outside = [p for p in model.parameters() if not any(p is q for layer in model.layers for q in layer.parameters())]
    mtp = getattr(model, "mtp", None) or []
    splits = []
    for r, mine in enumerate(layers):
        dense = expert = 0.0
        units: list[tuple[float, float]] = []
        for i in mine:
            e = _expert_params(model.layers[i])
            d = stats.count_parameters(model.layers[i]) - e
            dense, expert = dense + d, expert + e
            units.append((d / layout.tp, e / layout.ep))
        head = 0.0
        if r == 0:
            head += sum(p.numel() for p in outside if id(p) in first)
        if r == len(layers) - 1 or (layout.schedule == "dualpipev" and r == 0):
            # last stage: final norm, head, MTP (DualPipeV's last stage sits on rank 0)
            head += sum(p.numel() for p in outside if id(p) not in first and not _in(p, mtp))
            for module in mtp:
                e = _expert_params(module)
                d = stats.count_parameters(module) - e
                dense, expert = dense + d, expert + e
                units.append((d / layout.tp, e / layout.ep))
        dense += head
        splits.append(Split(dense=dense / layout.tp, expert=expert / layout.ep, root=head / layout.tp,
                            units=tuple(units)))
    return splits


def _in(p: torch.Tensor, modules: Any) -> bool:
    return any(p is q for m in modules for q in m.parameters())


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per rank on the busiest pipeline rank (all floats, bytes)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    gradients_at_peak: bool = True
    """Whether all gradients are held at the peak. The peak is at the loss, when every
    activation is saved; with one micro-batch and no pre-allocated gradient buffer the
    gradients do not exist yet (each appears as its layer's activations are freed)."""

    @property
    def total(self) -> float:
        return (self.parameters + (self.gradients if self.gradients_at_peak else 0.0) + self.optimizer
                + self.activations + self.transient)

    def terms(self) -> dict[str, float]:
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer state": self.optimizer,
                "activations": self.activations, "transient buffers": self.transient}

    def dominant(self) -> str:
        terms = self.terms()
        return max(terms, key=terms.get)  # type: ignore[arg-type]


def memory(model: nn.Module, layout: PlannedLayout, precision: Precision, acts: ActivationBytes, *,
           n_micro: int, **options: Any) -> MemoryPlan:
    """Peak bytes on the busiest pipeline rank (`rank_memory`'s largest total)."""
    return max(rank_memory(model, layout, precision, acts, n_micro=n_micro, **options), key=lambda plan: plan.total)


def rank_memory(model: nn.Module, layout: PlannedLayout, precision: Precision, acts: ActivationBytes, *,
                n_micro: int, optimizer_states: int = 2, checkpointing: str = "none", fused_attention: bool = False,
                vocab_size: int | None = None, tokens: int = 0) -> list[MemoryPlan]:
    """Peak bytes on each pipeline rank (one entry without pipeline parallelism).

    acts: `activation_memory.measure` for one micro-batch of `tokens` tokens (meta pass, fp32).
    Activations: the rank's blocks' saved bytes (at `precision.activation` bytes each) and the
    embedding/head part on the rank holding them, per stage, at the pipeline schedule's peak
    of micro-batches in flight (`pipeline_bubble.peak_activations`). Under tp, sequence and
    tensor parallelism split a block's saved bytes by tp except what every tp rank saves
    whole: the inputs of its attention and feed-forward (all-gathered along the sequence and
    saved by their first linears) and its routed experts and router (replicated: every tp
    rank routes all tokens). checkpointing
    "full" keeps each block's input and one block's activations; "selective" recomputes the
    attention sublayers. fused_attention drops the [seq, seq] attention probabilities (flash
    attention saves none). Gradients: as held, for every local parameter; with FSDP the shards.
    Transient: FSDP's gathered units and, on the head's rank, the gradients of the loss's
    backward (fp32 [tokens, vocab / tp]).
    """
    splits = split_parameters(model, layout)
    stages = rank_stages(model, layout)
    n_main = len(model.layers)
    scale = precision.activation / 4
    dense_shard, expert_shard = layout.dp_shard, layout.expert_shard
    fsdp = layout.dp_shard > 1
    plans: list[MemoryPlan] = []
    for r, split in enumerate(splits):
        local = split.dense / dense_shard + split.expert / expert_shard
        params = local * precision.param
        grads = local * precision.grad
        opt_share = split.dense / (dense_shard * (layout.dp_replicate if layout.zero1 else 1)) + \
            split.expert / (expert_shard * (layout.dp_replicate if layout.zero1 and layout.ep == 1 else 1))
        optimizer = opt_share * (optimizer_states * precision.state + precision.master)
        mine = [list(stage) for stage in stages[r]]
        dualpipev = layout.schedule == "dualpipev" and layout.pp > 1
        holds_head = r == len(splits) - 1 or (dualpipev and r == 0)
        if holds_head:  # the MTP blocks run on the last stage: the rank's last under every schedule
            mine[-1] += list(range(n_main, len(acts.blocks)))
        blocks = [i for stage in mine for i in stage]
        stage_bytes = [sum(_block_bytes(acts, i, layout.tp, checkpointing, fused_attention) for i in stage) * scale
                       for stage in mine]
        # the embedding/head part is mostly the fp32 logits and their log-probabilities
        outside = acts.outside / layout.tp if holds_head else 0.0
        if holds_head and layout.tp > 1:
            # the vocab-parallel loss keeps its input, this rank's logits, in its graph until its backward
            # (without tp they are freed once the log-softmax has read them)
            outside += acts.logits * scale / layout.tp
        if not dualpipev:  # it lives as long as the last stage's other activations
            stage_bytes[-1] += outside
        activations, backward_first = pipeline_bubble.peak_activations(
            layout.schedule, p=layout.pp, m=n_micro, v=layout.virtual_stages, rank=r, stage_bytes=stage_bytes)
        if dualpipev:  # DualPipeV's last stage runs each micro-batch's backward right after its forward
            activations += outside
        if checkpointing == "full" and blocks:  # one block's activations, rebuilt during its backward
            activations += max(_block_bytes(acts, i, layout.tp, "none", fused_attention) for i in blocks) * scale
        transient = 0.0
        if holds_head and vocab_size:
            # the loss's backward starts with every activation still saved: log-softmax's backward
            # holds the gradient arriving at its output and the one it returns for the logits,
            # both [tokens, vocab] in fp32 (measured: one alone undercounts by that much); torch's
            # vocab-parallel loss (tp > 1) writes the logits' gradient in one step instead
            transient += (1 if layout.tp > 1 else 2) * tokens * vocab_size * 4 / layout.tp
        if layout.pp > 1:
            # a pipeline rank's gradients exist at its activation peak only if a backward ran on
            # it before (1F1B's steady state once m exceeds the warm-up; never under GPipe)
            held = backward_first
        else:
            # accumulated over micro-batches, or DDP's gradient buckets (allocated when it wraps the model)
            held = n_micro > 1 or (layout.dp_replicate > 1 and not fsdp)
        if fsdp:
            # FSDP2's gathered copies beside the shards: the root unit (embedding, final norm, head)
            # stays gathered from its forward to the end of its backward, and a block's all-gather
            # leaves a flat buffer of the block's size alive until the next all-gather. At the loss
            # (the head's rank) that is the root and one block; a pipeline rank without the loss
            # peaks as a backward starts: the root, the block being backwarded gathered, that flat
            # buffer and the block's unsharded gradient. Without resharding after the forward every
            # block stays gathered. Routed experts are in their block's unit only when FSDP shards them.
            units = [d + (e if expert_shard > 1 else 0.0) for d, e in split.units]
            block = max(units, default=0.0)
            gathered = split.root + (block if layout.reshard_after_forward else sum(units))
            if not holds_head:
                gathered += block
                transient += block * precision.grad
            transient += gathered * precision.param
            if layout.pp > 1:
                # torch's schedules run every backward of an FSDP stage without resharding or gradient
                # sync (`backward_maybe_with_nosync`): gradients stay unsharded until the step ends
                grads = (split.dense + split.expert) * precision.grad
        plan = MemoryPlan(parameters=params, gradients=grads, optimizer=optimizer, activations=activations,
                          transient=transient, gradients_at_peak=held)
        plans.append(plan)
    return plans


def _block_bytes(acts: ActivationBytes, i: int, tp: int, checkpointing: str, fused_attention: bool) -> float:
    """Saved bytes of block `i` for one micro-batch on one tensor-parallel rank (see `memory`)."""
    scores = acts.scores[i] if fused_attention else 0.0
    if checkpointing == "full":  # only the block's input, sequence-parallel under tp
        return acts.block_inputs[i] / tp
    saved = acts.blocks[i] - scores
    if checkpointing == "selective":  # the attention input stays, its insides are recomputed
        saved -= acts.attention[i] - scores - acts.block_inputs[i]
    whole = acts.routed[i] if acts.routed else 0.0
    if tp > 1 and acts.module_inputs:
        whole += acts.module_inputs[i]
    whole = min(whole, saved)
    return (saved - whole) / tp + whole


def precision_of(policy: Any) -> Precision:
    """Bytes per element under a built or configured precision policy (by registered name)."""
    name = type(policy).__name__ if not hasattr(policy, "__fn_or_cls__") else policy.__fn_or_cls__.__name__
    table = {
        "FP32": Precision(),
        # autocast keeps fp32 parameters, gradients and states; activations mostly in the low dtype
        "BF16Autocast": Precision(activation=2), "FP16Autocast": Precision(activation=2),
        # torchao's fp8 training keeps fp32 weights; matmul inputs saved in bf16 or fp8 (counted as bf16)
        "FP8": Precision(activation=2),
        # bf16 weights and gradients, fp32 masters kept by the optimizer wrapper
        "BF16Params": Precision(param=2, grad=2, master=4, activation=2),
    }
    return table.get(name, Precision())


def fits(plan: MemoryPlan, capacity_gb: float = 80.0) -> bool:
    """Whether the plan's peak fits a device of `capacity_gb` GB (10^9 bytes, as GPUs are sold)."""
    return plan.total <= capacity_gb * 1e9


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"
