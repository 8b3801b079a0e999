"""The memory model behind `--dry-run`: per-rank bytes of parameters, gradients, optimizer
state, activations and transient buffers, for a model (on the meta device) under a parallel
`Layout` and a precision policy's `ElementBytes`.

Conventions: a "rank" is one process (one GPU). The layout is the parallel plan's own answer
(`ParallelPlan.layout`): dense parameters are split by `tp` (every block linear layer, the
embedding and head vocab-parallel) and sharded by FSDP over `dp_shard`; routed experts are
split over `ep` and held whole by their owner, replicated over what of the data-parallel
ranks is left (tessera's expert parallelism: FSDP, DDP and ZeRO-1 leave them alone). Pipeline
stages and the layers they hold are the pipeline's own placement (`Layout.rank_stages`): the
embedding on the first stage, the final norm, head and MTP modules on the last (DeepSeek-V3's
placement, arXiv:2412.19437 §3.2.1). The busiest rank is reported: its parameters and its
peak activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from torch import nn

from tessera.components.interfaces import ElementBytes, RoutedExperts
from tessera.components.optim.state_size import ADAMW_STATE_TENSORS
from tessera.components.parallel.layout import Layout
from tessera.components.train import pipeline_bubble
from tessera.components.train.activation_memory import ActivationBytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankParameters:
    """Parameter counts of one pipeline rank before data-parallel sharding: `dense` (split by
    tp) and `expert` (routed experts, split by ep); `dense_state`, `expert_state`: the
    optimizer's state elements for them, split alike; `root`: the dense parameters outside the
    blocks (embedding, final norm, head: FSDP's root unit); `units`: per block (main layers,
    then MTP modules), its (dense, expert) counts, each block being one FSDP unit."""

    dense: float
    expert: float
    dense_state: float
    expert_state: float
    root: float = 0.0
    units: tuple[tuple[float, float], ...] = ()


def rank_parameters(model: nn.Module, layout: Layout,
                    optimizer_states: Mapping[int, float] | None = None) -> list[RankParameters]:
    """Per pipeline rank: its dense and routed-expert parameter counts after tp and ep, and
    the state elements `optimizer_states` gives them (see `StepShape.optimizer_states`)."""
    def states(p: nn.Parameter) -> float:
        return ADAMW_STATE_TENSORS if optimizer_states is None else optimizer_states.get(id(p), 0.0)

    in_layers = {id(p) for layer in model.layers for p in layer.parameters()}
    first = {id(p) for p in model.embedding.parameters()}
    mtp = list(getattr(model, "mtp", None) or [])
    in_mtp = {id(p) for module in mtp for p in module.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_layers]
    out = []
    for rank, stages in enumerate(layout.rank_stages(len(model.layers))):
        blocks = [model.layers[i] for stage in stages for i in stage]
        head = [p for p in outside if id(p) in first] if layout.holds_first(rank) else []
        if layout.holds_last(rank):  # final norm, head, MTP (DualPipeV's last stage sits on rank 0)
            head += [p for p in outside if id(p) not in first and id(p) not in in_mtp]
            blocks += mtp
        counts = [_dense_and_expert(block) for block in blocks]
        state = [_dense_and_expert(block, states) for block in blocks]
        head_count, head_state = sum(p.numel() for p in head), sum(states(p) * p.numel() for p in head)
        out.append(RankParameters(
            dense=(sum(d for d, _ in counts) + head_count) / layout.tp, expert=sum(e for _, e in counts) / layout.ep,
            dense_state=(sum(d for d, _ in state) + head_state) / layout.tp,
            expert_state=sum(e for _, e in state) / layout.ep,
            root=head_count / layout.tp, units=tuple((d / layout.tp, e / layout.ep) for d, e in counts)))
    return out


def _dense_and_expert(module: nn.Module, weight: Callable[[nn.Parameter], float] = lambda p: 1.0
                      ) -> tuple[float, float]:
    """(dense, routed-expert) parameter elements of `module`, each parameter's times `weight`."""
    experts = {id(p) for m in module.modules() if isinstance(m, RoutedExperts) for p in m.routed_experts.parameters()}
    sums = [0.0, 0.0]
    for p in module.parameters():
        sums[id(p) in experts] += weight(p) * p.numel()
    return sums[0], sums[1]


@dataclasses.dataclass(kw_only=True)
class RankMemory:
    """Bytes one rank holds at its peak (all floats, bytes)."""

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

    def fits(self, capacity_gb: float = 80.0) -> bool:
        """Whether the peak fits a device of `capacity_gb` GB (10^9 bytes, as GPUs are sold)."""
        return self.total <= capacity_gb * 1e9


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepShape:
    """What one training step runs on each rank, beside the layout.

    n_micro: micro-batches per step; tokens: tokens per micro-batch; vocab_size: the head's
    width (None: no loss-backward buffers counted); optimizer_states: {id(parameter): state
    tensors of its size} as `tessera.components.optim.state_size.state_tensors` gives them for
    the run's optimizer (None: AdamW's two for every parameter); checkpointing: "none",
    "selective" (attention recomputed) or "full" (each block's input kept); fused_attention:
    attention saves no [seq, seq] probabilities (flash).
    """

    n_micro: int
    tokens: int = 0
    vocab_size: int | None = None
    optimizer_states: Mapping[int, float] | None = None
    checkpointing: str = "none"
    fused_attention: bool = False


def peak_memory(model: nn.Module, layout: Layout, element: ElementBytes, acts: ActivationBytes, *,
                step: StepShape) -> RankMemory:
    """Peak bytes on the busiest pipeline rank (`rank_memory`'s largest total)."""
    return max(rank_memory(model, layout, element, acts, step=step), key=lambda rank: rank.total)


def rank_memory(model: nn.Module, layout: Layout, element: ElementBytes, acts: ActivationBytes, *,
                step: StepShape) -> list[RankMemory]:
    """Peak bytes on each pipeline rank (one entry without pipeline parallelism).

    acts: `activation_memory.measure` for one micro-batch of `step.tokens` tokens (meta pass,
    fp32). Parameters, gradients (as held, for every local parameter; with FSDP the shards)
    and optimizer state: `_state_bytes`; activations: `_activation_bytes`; FSDP's gathered
    units and the loss's backward buffers: `_transient_bytes`.
    """
    ranks = []
    stages = layout.rank_stages(len(model.layers))
    for rank, params in enumerate(rank_parameters(model, layout, step.optimizer_states)):
        held_params, grads, optimizer = _state_bytes(params, layout, element)
        blocks = [list(stage) for stage in stages[rank]]
        if layout.holds_last(rank):  # the MTP blocks run on the last stage: the rank's last under every schedule
            blocks[-1] += list(range(len(model.layers), len(acts.blocks)))
        activations, backward_first = _activation_bytes(acts, layout, element, step, rank=rank, stages=blocks)
        transient, unsynced_grads = _transient_bytes(params, layout, element, step, holds_head=layout.holds_last(rank))
        if layout.pp > 1:
            # a pipeline rank's gradients exist at its activation peak only if a backward ran on
            # it before (1F1B's steady state once m exceeds the warm-up; never under GPipe)
            held = backward_first
        else:
            # accumulated over micro-batches, or DDP's gradient buckets (allocated when it wraps the model)
            held = step.n_micro > 1 or (layout.dp_replicate > 1 and layout.dp_shard == 1)
        ranks.append(RankMemory(parameters=held_params, gradients=grads if unsynced_grads is None else unsynced_grads,
                                optimizer=optimizer, activations=activations, transient=transient,
                                gradients_at_peak=held))
    return ranks


def _state_bytes(params: RankParameters, layout: Layout, element: ElementBytes) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer state) bytes of one rank: FSDP shards the dense
    parameters (and the experts when ep = 1); ZeRO-1 shards the dense state over the replicas
    (and the experts' state when ep = 1: under ep each process steps its own experts)."""
    dense_shard, expert_shard = layout.dp_shard, layout.expert_shard
    local = params.dense / dense_shard + params.expert / expert_shard
    dense_split = dense_shard * (layout.dp_replicate if layout.zero1 else 1)
    expert_split = expert_shard * (layout.dp_replicate if layout.zero1 and layout.ep == 1 else 1)
    optimizer = (params.dense_state / dense_split + params.expert_state / expert_split) * element.optimizer_state + \
        (params.dense / dense_split + params.expert / expert_split) * element.master
    return local * element.parameter, local * element.gradient, optimizer


def _activation_bytes(acts: ActivationBytes, layout: Layout, element: ElementBytes, step: StepShape, *, rank: int,
                      stages: list[list[int]]) -> tuple[float, bool]:
    """The most activation bytes pipeline rank `rank` holds at once, and whether a backward ran
    on it before that peak.

    `stages`: the block indices of each stage it holds (MTP blocks in its last). The rank's
    blocks' saved bytes (at `element.activation` bytes each) and the embedding/head part on
    the rank holding them, per stage, at the pipeline schedule's peak of micro-batches in
    flight (`pipeline_bubble.peak_activations`); see `_block_bytes` for tensor parallelism and
    checkpointing.
    """
    scale = element.activation / 4
    tp, checkpointing, fused = layout.tp, step.checkpointing, step.fused_attention
    holds_head = layout.holds_last(rank)
    dualpipev = layout.schedule == "DualPipeV" and layout.pp > 1
    stage_bytes = [sum(_block_bytes(acts, i, tp, checkpointing, fused) for i in stage) * scale for stage in stages]
    # the embedding/head part is mostly the fp32 logits and their log-probabilities
    outside = acts.outside / tp if holds_head else 0.0
    if holds_head and tp > 1:
        # the vocab-parallel loss keeps its input, this rank's logits, in its graph until its backward
        # (without tp they are freed once the log-softmax has read them)
        outside += acts.logits * scale / tp
    if not dualpipev:  # it lives as long as the last stage's other activations
        stage_bytes[-1] += outside
    activations, backward_first = pipeline_bubble.peak_activations(
        layout.schedule, p=layout.pp, m=step.n_micro, v=layout.virtual_stages, rank=rank, stage_bytes=stage_bytes)
    if dualpipev:  # DualPipeV's last stage runs each micro-batch's backward right after its forward
        activations += outside
    blocks = [i for stage in stages for i in stage]
    if checkpointing == "full" and blocks:  # one block's activations, rebuilt during its backward
        activations += max(_block_bytes(acts, i, tp, "none", fused) for i in blocks) * scale
    return activations, backward_first


def _transient_bytes(params: RankParameters, layout: Layout, element: ElementBytes, step: StepShape, *,
                     holds_head: bool) -> tuple[float, float | None]:
    """Transient bytes of one rank at its peak, and its gradients when a pipeline keeps FSDP's
    gradients unsharded until the step ends (None: as `_state_bytes` says).

    On the head's rank the loss's backward starts with every activation still saved:
    log-softmax's backward holds the gradient arriving at its output and the one it returns
    for the logits, both [tokens, vocab] in fp32 (measured: one alone undercounts by that
    much); torch's vocab-parallel loss (tp > 1) writes the logits' gradient in one step
    instead. FSDP2 keeps gathered copies beside the shards: the root unit (embedding, final
    norm, head) stays gathered from its forward to the end of its backward, and a block's
    all-gather leaves a flat buffer of the block's size alive until the next all-gather. At
    the loss (the head's rank) that is the root and one block; a pipeline rank without the
    loss peaks as a backward starts: the root, the block being backwarded gathered, that flat
    buffer and the block's unsharded gradient. Without resharding after the forward every
    block stays gathered. Routed experts are in their block's unit only when FSDP shards them.
    """
    transient = 0.0
    if holds_head and step.vocab_size:
        transient += (1 if layout.tp > 1 else 2) * step.tokens * step.vocab_size * 4 / layout.tp
    if layout.dp_shard == 1:
        return transient, None
    units = [d + (e if layout.expert_shard > 1 else 0.0) for d, e in params.units]
    block = max(units, default=0.0)
    gathered = params.root + (block if layout.reshard_after_forward else sum(units))
    if not holds_head:
        gathered += block
        transient += block * element.gradient
    transient += gathered * element.parameter
    if layout.pp > 1:
        # torch's schedules run every backward of an FSDP stage without resharding or gradient
        # sync (`backward_maybe_with_nosync`): gradients stay unsharded until the step ends
        return transient, (params.dense + params.expert) * element.gradient
    return transient, None


def _block_bytes(acts: ActivationBytes, i: int, tp: int, checkpointing: str, fused_attention: bool) -> float:
    """Saved bytes of block `i` for one micro-batch on one tensor-parallel rank.

    Under tp, sequence and tensor parallelism split a block's saved bytes by tp except what
    every tp rank saves whole: the inputs of its attention and feed-forward (all-gathered
    along the sequence and saved by their first linears) and its routed experts and router
    (replicated: every tp rank routes all tokens). checkpointing "full" keeps each block's
    input; "selective" recomputes the attention sublayers. fused_attention drops the
    [seq, seq] attention probabilities (flash attention saves none)."""
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
