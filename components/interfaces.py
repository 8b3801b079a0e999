"""The abstract bases every registry checks against.

Each kind of swappable block has one base here. A registered class must subclass its
kind's base; a registered factory must be annotated to return it. The bases are kept
small on purpose: they state the forward contract and tensor shapes that any
implementation honours, so a recipe can swap one implementation for another.

Shape letters: B batch, T sequence length, D model width, H heads, Dh head width.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:  # what a parallel plan answers `layout` with (a layer above)
    from tessera.components.parallel.layout import Layout

PositionKind = Literal["rotary", "additive", "absolute", "none"]


class Norm(nn.Module, abc.ABC):
    """Normalises over the last dimension.

    forward(x: [..., D]) -> [..., D], same dtype as `x`.
    """

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Re-initialise parameters in place (weights to one, biases to zero). The stds are
        accepted, and ignored, so that every block's reset has one signature; tessera calls a
        norm's with no arguments, so a third-party norm may define `reset_parameters(self)`."""


class PositionEncoding(nn.Module, abc.ABC):
    """Injects token positions. `kind` says where it acts:

    - "rotary": rotates queries and keys inside attention (`RotaryEncoding`);
    - "additive": produces a per-head bias added to attention scores;
    - "absolute": adds a vector to the token embeddings;
    - "none": does nothing (NoPE).

    An attention declares in `Attention.supported_positions` which kinds it accepts.
    """

    kind: ClassVar[PositionKind]

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Re-initialise learned parameters in place (a no-op for parameter-free encodings)."""


class RotaryEncoding(PositionEncoding):
    """Rotary encoding applied to queries and keys.

    forward(x: [B, H, T, Dh], positions: [T] or [B, T] int64) -> [B, H, T, Dh].
    Dh must be even. Parameter-free; frequencies are derived from Dh at call time so the
    same encoding object serves any head width.
    """

    kind: ClassVar[PositionKind] = "rotary"

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def softmax_scale_multiplier(self) -> float:
        """Factor on the attention softmax scale (context-extension schemes such as YaRN raise it)."""
        return 1.0


class AdditiveBias(PositionEncoding):
    """A per-head bias added to attention scores before the softmax (e.g. ALiBi).

    forward(n_heads: int, positions: [T] int64) -> bias [H, T, T] fp32, entry [h, i, j] added
    to the score of query i against key j. Parameter-free; derived from `n_heads` at call time.
    """

    kind: ClassVar[PositionKind] = "additive"

    @abc.abstractmethod
    def forward(self, n_heads: int, positions: torch.Tensor) -> torch.Tensor: ...

    def pair_bias(self, n_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The bias of queries at `q_pos` against keys at `k_pos` (int64 tensors that
        broadcast together): [H, *broadcast shape], for attention that scores only some
        query-key pairs (gathered key blocks). Default: read from `forward` over positions
        0..max; an encoding with a closed form overrides it so no [H, T, T] is built."""
        n = int(torch.maximum(q_pos.max(), k_pos.max())) + 1
        return self.forward(n_heads, torch.arange(n, device=q_pos.device))[:, q_pos, k_pos]


class AbsoluteEncoding(PositionEncoding):
    """A vector per position added to the token embeddings (learned or sinusoidal).

    forward(positions: [T] or [B, T] int64, dim: int) -> [T, dim] or [B, T, dim] fp32 (per-row
    positions are what batched decoding with left padding passes).
    """

    kind: ClassVar[PositionKind] = "absolute"

    @abc.abstractmethod
    def forward(self, positions: torch.Tensor, dim: int) -> torch.Tensor: ...

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Re-initialise learned tables with Normal(0, init_std) (None: 1/sqrt(dim); no-op
        for fixed encodings)."""


class NoPosition(PositionEncoding):
    """Marker base of encodings that inject nothing (NoPE)."""

    kind: ClassVar[PositionKind] = "none"


def position_kind(value: Any) -> str | None:
    """The `kind` of a position encoding given as a module, a class, or a fiddle config of one."""
    if value is None:
        return None
    target = getattr(value, "__fn_or_cls__", value)
    target = target if isinstance(target, type) else type(target)
    return getattr(target, "kind", None)


class Attention(nn.Module, abc.ABC):
    """Causal self-attention over a full sequence (decoding over a cache is the separate
    `CachedAttention` capability).

    forward(x: [B, T, D], *, doc_ids: [B, T] int | None = None) -> [B, T, D].
    With `doc_ids`, a token attends only to earlier tokens of the same document, which is
    how packed sequences of several documents are trained.
    """

    supported_positions: ClassVar[frozenset[str]] = frozenset({"rotary", "additive", "none"})
    """Position kinds this attention accepts as its `position` argument (absolute ones belong
    to the model, which adds them to the embeddings)."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor: ...

    @abc.abstractmethod
    def score_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token spent outside parameter matmuls (scores and weighted sum).

        Uses the full-sequence convention (no causal halving), as MFU reports usually do.
        """

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Re-initialise parameters in place: input projections Normal(0, init_std), output
        projections Normal(0, out_std), norms to one. A None std means 1/sqrt(fan_in) of each
        weight (`tessera.components.model.init.fan_in_std`), so `reset_parameters()` works on its own;
        a model's init pass passes its own stds. Implementations also call it from their
        constructor, so a block is usable as built."""


class AttentionCache(abc.ABC):
    """One layer's decoding state (keys and values, a latent, or a recurrent state), made by
    `CachedAttention.new_cache`. Rows of a batch advance in lockstep: `length` counts the
    token slots written so far (left padding included), the same for every row.

    `truncate(length)` forgets the slots from `length` on (a rejected speculative draft; an
    implementation may only go back as far as the last forward); `nbytes()` is the memory the
    state holds, for tables of bytes per token.
    """

    length: int

    @abc.abstractmethod
    def truncate(self, length: int) -> None: ...

    @abc.abstractmethod
    def nbytes(self) -> int: ...


class CachedAttention(abc.ABC):
    """An attention that decodes incrementally: a capability of `Attention`s that can generate.

    `new_cache(batch=B, max_len=S, device=..., dtype=...)` returns an empty `AttentionCache`
    for up to S token slots per row. `forward_cached(x: [B, T, D], cache=, positions=[B, T]
    int64) -> [B, T, D]` attends the T new tokens to everything the cache holds and to each
    other (causally), then records them in the cache. `positions` are each token's position in
    its own row (rotary angles, ALiBi distances, windows and sparse layouts are computed from
    them); -1 marks a padding token, which no other token attends to and whose output is
    finite but meaningless. The result equals `forward` over the whole sequence at those
    positions (up to rounding).
    """

    @abc.abstractmethod
    def new_cache(self, *, batch: int, max_len: int, device: torch.device | str,
                  dtype: torch.dtype) -> AttentionCache: ...

    @abc.abstractmethod
    def forward_cached(self, x: torch.Tensor, *, cache: AttentionCache, positions: torch.Tensor) -> torch.Tensor: ...


class FeedForward(nn.Module, abc.ABC):
    """Position-wise feed-forward network.

    forward(x: [B, T, D]) -> [B, T, D].
    """

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Re-initialise parameters in place: input projections Normal(0, init_std), output
        projections Normal(0, out_std), norms to one. A None std means 1/sqrt(fan_in) of each
        weight (`tessera.components.model.init.fan_in_std`), so `reset_parameters()` works on its own;
        a model's init pass passes its own stds. Implementations also call it from their
        constructor, so a block is usable as built."""


class OptimizerStepHook(abc.ABC):
    """A module with state updated outside autograd once per optimizer step (e.g. the MoE
    router's load-balancing bias). The trainer calls `after_optimizer_step()` on every such
    module after `optimizer.step()`."""

    @abc.abstractmethod
    def after_optimizer_step(self) -> None: ...


class ReportsExpertLoad(abc.ABC):
    """A module that counts how many tokens each expert received in the last step, for the
    trainer's load metrics. `last_load`: float tensor [n_experts] (token-expert assignments)."""

    last_load: torch.Tensor


class ExpertBank(abc.ABC):
    """Routed experts held as stacked weights, so expert parallelism can shard them: every
    direct parameter is [n_experts, ...] with expert e's weights at index e (sharded along
    dim 0, each process keeping a contiguous block of experts).

    forward(x: [N, D], indices: [N, K] int64, weights: [N, K], keep: [N, K] bool | None) -> [N, D]:
    sum over k of weights[n, k] * expert_{indices[n, k]}(x[n]); assignments with keep=False
    contribute nothing. While `expert_parallel` is not None, forward must return
    `self.expert_parallel(self, x, indices, weights, keep)`: expert parallelism sets it after
    sharding the weights, and its all-to-all calls `grouped_forward` on the rows it received.
    """

    n_experts: int
    expert_parallel: Callable[..., torch.Tensor] | None = None

    @abc.abstractmethod
    def grouped_forward(self, xs: torch.Tensor, rows: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        """The experts on rows sorted by expert: xs [R, D], `rows` int64 [E'] (expert e' has
        rows[e'] consecutive rows; they sum to R), `weights` this bank's direct parameters in
        registration order, sliced to the same E' experts and in xs's dtype -> [R, D]."""


class RoutedExperts(abc.ABC):
    """A feed-forward that sends each token to `top_k` of `n_experts` routed experts (a mixture
    of experts). What tessera reads from it:

    - `routed_experts`: the module holding the routed experts' weights. The statistics count
      its parameters at `active_fraction()` per token (activated parameters, training FLOPs)
      and every other parameter at one; the planner counts them as the experts' memory.
      Expert parallelism shards it, so it must be an `ExpertBank` for `ep` > 1.
    - `top_k`, `n_experts`: the expert-parallel dispatch volume the planner predicts.
    - `expert_parallel_faults(ep)`: the block's own constraints on the expert-parallel degree
      (routing groups, a per-device balance loss) beyond `ep` dividing `n_experts`, which the
      caller checks.
    """

    @property
    @abc.abstractmethod
    def routed_experts(self) -> nn.Module: ...

    @property
    @abc.abstractmethod
    def n_experts(self) -> int: ...

    @property
    @abc.abstractmethod
    def top_k(self) -> int: ...

    def active_fraction(self) -> float:
        """Share of the routed experts' parameters one token uses (top_k / n_experts)."""
        return self.top_k / self.n_experts

    def expert_parallel_faults(self, ep: int) -> list[str]:
        """Why this block cannot shard its experts over `ep` processes beyond `ep` | n_experts
        (each fault names the constructor argument and a fix, without the block's path); []."""
        return []


class TensorParallel(abc.ABC):
    """A block (attention or feed-forward) that states its own tensor-parallel split.

    `tensor_parallel_plan(output_layout=...)` maps its submodules' relative names to styles of
    `tessera.components.parallel.tp_styles` (see its contract: the input arrives as a DTensor
    replicated over the tp mesh, the output leaves with `output_layout`). An entry for "" (the
    block itself) takes over its input and output instead: it receives the residual stream's
    layout, which is `output_layout` (a residual sublayer reads and writes the same stream).

    Checked from the config before anything is built: tp must divide each constructor
    argument named in `tensor_parallel_divides` (heads or hidden units the plan splits), and
    the blocks held by the arguments in `tensor_parallel_parts` (split by their own plans
    inside this one's, e.g. a MoE's shared experts) are checked the same way.
    """

    tensor_parallel_divides: ClassVar[tuple[str, ...]] = ()
    tensor_parallel_parts: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def tensor_parallel_plan(self, *, output_layout: Any) -> dict[str, Any]: ...


class SecondOrderOptimizer(abc.ABC):
    """An optimizer whose step differentiates the gradients again (Hessian-vector products,
    e.g. Sophia-H's Hutchinson estimate): when `wants_second_order()` is True the trainer runs
    that step's backward with `create_graph=True` and attention on SDPA's math kernel."""

    @abc.abstractmethod
    def wants_second_order(self) -> bool: ...


class HessianEstimateOptimizer(abc.ABC):
    """An optimizer that folds in a Gauss-Newton-Bartlett Hessian estimate every
    `hessian_interval` steps (Sophia-G): after such an optimizer step the trainer backprops
    the loss on labels sampled from the model's own predictions, then calls
    `update_hessian(n_tokens)` with the number of tokens the loss averaged over."""

    hessian_interval: int

    @abc.abstractmethod
    def update_hessian(self, batch_size: int) -> None: ...


class AuxiliaryLoss(abc.ABC):
    """A module that adds a term to the training loss (e.g. MoE balance losses).

    `auxiliary_loss()` returns the term from the latest forward (a scalar tensor, already
    weighted), or None when it has none.
    """

    @abc.abstractmethod
    def auxiliary_loss(self) -> torch.Tensor | None: ...


class DryRunError(ValueError):
    """What `--dry-run` asked of an object that cannot answer it (a precision policy's bytes
    per element, a parallel plan's layout, a component's activations on the meta device): the
    message names the object and what to define or change."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElementBytes:
    """Bytes per element of each kind of training state a precision policy keeps: what
    `--dry-run` multiplies parameter and activation counts by.

    parameter, gradient: as the model holds them; optimizer_state: each optimizer state
    (AdamW keeps two per parameter); master: an fp32 master copy the optimizer keeps beside
    lower-precision parameters (0: none); activation: what the forward saves for the
    backward, in the compute dtype.
    """

    parameter: int
    gradient: int
    optimizer_state: int
    master: int = 0
    activation: int


class PrecisionPolicy(abc.ABC):
    """The run's numeric precision, one global policy (never a per-module dtype field).

    `compute_dtype`: the dtype matmuls run in (MFU is measured against its peak);
    `autocast(device_type)`: the context forward passes run under;
    `grad_scaler(device_type)`: a loss scaler, or None when no scaling is needed;
    `prepare(model)`: model conversion before training (e.g. fp8 linear layers, bf16 weights);
    `wrap_optimizer(optimizer)`: the optimizer the run steps (e.g. one keeping fp32 masters).
    """

    compute_dtype: torch.dtype
    param_dtype: torch.dtype | None = None
    """The dtype parameters are held in for compute (None: as initialised, fp32)."""

    @abc.abstractmethod
    def autocast(self, device_type: str) -> Any: ...

    def grad_scaler(self, device_type: str) -> Any:
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def element_bytes(self, device_type: str) -> ElementBytes:
        """Bytes per element this policy keeps of each kind of training state on `device_type`.

        The default answers for a policy that only picks the compute dtype (it sets no
        `param_dtype` and overrides neither `prepare` nor `wrap_optimizer`): parameters,
        gradients and optimizer state stay fp32, as initialised, and activations are saved in
        `compute_dtype`. Any other policy stores something its own way, so it must override
        this; until it does, DryRunError names it rather than guess fp32.
        """
        policy = type(self)
        if self.param_dtype is not None or policy.prepare is not PrecisionPolicy.prepare or \
                policy.wrap_optimizer is not PrecisionPolicy.wrap_optimizer:
            raise DryRunError(f"precision policy {policy.__module__}.{policy.__qualname__} changes how parameters or "
                              f"optimizer state are stored (param_dtype, prepare or wrap_optimizer) but does not say "
                              f"its bytes per element: define element_bytes(device_type) returning "
                              f"tessera.components.interfaces.ElementBytes")
        return ElementBytes(parameter=4, gradient=4, optimizer_state=4, activation=self.compute_dtype.itemsize)


class DataShare(NamedTuple):
    """Which share of every batch a process reads: share `rank` of `size` (the processes that
    read different data; the processes of one tensor-parallel group or one pipeline read the
    same share). `DataShare(0, 1)`: the whole batch."""

    rank: int
    size: int


class ParallelPlan(abc.ABC):
    """How a model is laid out across processes.

    `apply` receives the model still on the meta device, the run's precision policy (a plan
    that casts parameters itself, like FSDP's mixed precision, honours its `param_dtype`) and
    the device type the run trains on, and returns the module to train (possibly wrapped or
    sharded); it must not materialise weights.
    """

    @abc.abstractmethod
    def apply(self, model: nn.Module, *, precision: PrecisionPolicy | None = None,
              device: str = "cpu") -> nn.Module: ...

    def layout(self, model: nn.Module, *, world_size: int) -> Layout:
        """How this plan lays `model` (on the meta device is enough) out for a run of
        `world_size` processes: the degrees, the pipeline schedule and the stages each rank
        holds (`tessera.components.parallel.layout.Layout`), after the checks `apply` would
        make; what `--dry-run` sizes memory and communication by. Creates no process group.
        Default: DryRunError naming the plan (a plugin plan defines it to be sized)."""
        plan = type(self)
        raise DryRunError(f"parallel plan {plan.__module__}.{plan.__qualname__} does not say how it lays a model out: "
                          f"define layout(model, world_size=...) returning a "
                          f"tessera.components.parallel.layout.Layout to size it with --dry-run")

    def materialize(self, model: nn.Module, device: str) -> None:
        """Allocate the (meta-device) model's storage on `device` and initialise it from the
        current RNG state, as `model.init_weights()` would in one process."""
        model.to_empty(device=device)
        model.init_weights()

    def ready(self, model: nn.Module) -> None:
        """Called once the model holds its final weights (materialised, converted by the
        precision policy, blocks compiled) and before the optimizer is built: where a plan
        that communicates gradients after the backward (DDP) sets itself up."""
        return None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer the run steps, given the one built over the model's parameter groups
        (e.g. ZeRO-1 shards its state across the data-parallel processes). Default: as is."""
        return optimizer

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step that updated the weights, `step` counting from 1
        (e.g. local SGD / DiLoCo averaging the weights every H steps)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The plan's own state for the checkpoint's `extra` tree (a compression hook's error
        feedback, DiLoCo's outer optimizer): tensors and JSON values. Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, once the plan is ready and before the first
        step. Default: nothing."""
        return None

    def share_run_state(self, state_dict: Callable[[], dict[str, Any]],
                        load_state_dict: Callable[[dict[str, Any]], None]) -> None:
        """Called once before the first step (after any checkpoint resume) with two callbacks
        over the run's own progress: `state_dict()` returns the step, token count, loss
        history, RNG and data position; `load_state_dict(state)` puts such a state in place
        (between steps, or at the start of a step before its first batch is drawn). A plan that
        restores a replica from a live peer rather than a checkpoint (torchft) sends and loads
        them with the weights. Default: nothing."""
        return None

    @property
    def is_main_process(self) -> bool:
        """True on the process that logs and writes files."""
        return True

    @property
    def data_parallel(self) -> DataShare:
        """This process's share of every batch, valid once `apply` has run. Default: every
        process of the group reads its own share (pure data parallelism), the whole batch
        outside a process group; a plan whose processes also split the model (tensor or
        pipeline parallelism) narrows it to the processes that hold different data."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return DataShare(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return DataShare(0, 1)

    def forward_backward(self, model: nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], *,
                         n_micro: int, losses: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                         backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
        """One optimizer step's forward and backward passes on this process: gradients of the
        mean loss over `n_micro` micro-batches accumulate in the parameters' `.grad`.

        `losses(batch)` runs the forward and returns the named loss terms (scalars) of one
        micro-batch; `backward(loss)` backpropagates a scalar (loss scaling, second-order
        graphs). Returns each term's mean over this process's micro-batches. The default is
        plain gradient accumulation; a plan may overlap communication with it (DDP's
        `no_sync` until the last micro-batch) or replace it (a pipeline schedule).
        """
        totals: dict[str, float] = {}
        for batch in micro_batches:
            terms = losses(batch)
            backward(torch.stack(list(terms.values())).sum() / n_micro)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.item() / n_micro
        return totals

    def gradient_norm_group(self) -> Any:
        """The process group over which parameters are split into disjoint sets that each
        process holds whole (pipeline stages): the global gradient norm sums their squared
        norms. None: every process's (possibly DTensor) gradients already give the global norm."""
        return None

    def validation_loss(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float | None:
        """The mean LM loss of `batches` when the plan must run the forward itself (a pipeline
        of stages); None: the trainer runs `model(...)` as usual."""
        return None

    def mean_over_data_parallel(self, values: dict[str, float], device: str) -> dict[str, float]:
        """`values` (per-process means) averaged over the processes that hold different data,
        so every process reports and judges the loss of the whole batch. Default: the whole
        world when a process group is up, else unchanged."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return values
        size = torch.distributed.get_world_size()
        if size == 1:
            return values
        names = sorted(values)
        total = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)  # gloo has no AVG: sum, then divide
        return {n: v / size for n, v in zip(names, total.tolist(), strict=True)}


class ResumableState:
    """A part whose state an exact resume needs beyond weights and optimizer (a compression
    hook's error feedback, DiLoCo's outer optimizer): the checkpoint saves `state_dict()` and
    the resumed run hands it back to `load_state_dict` (after `register`/`begin`, before the
    first step). Tensors are this process's own. Default: nothing to carry."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class CommHook(ResumableState, abc.ABC):
    """How a data-parallel (DDP) run communicates gradients: `register(ddp, process_group)`
    installs a hook with torch's `DistributedDataParallel.register_comm_hook` contract (fp16
    compression, PowerSGD, 1-bit with error feedback, ...). `bytes_sent` counts the payload
    bytes this process handed to collectives since it was registered, so benchmarks and tests
    can compare hooks with plain all-reduce."""

    bytes_sent: int = 0

    @abc.abstractmethod
    def register(self, ddp: nn.Module, process_group: Any) -> None: ...


class PeriodicSync(ResumableState, abc.ABC):
    """Data parallelism without per-step gradient averaging (local SGD, DiLoCo): every
    replica steps its own optimizer on its own data, and `after_step(model, step,
    process_group)` (after every optimizer step, `step` counting from 1) synchronises the
    weights every so many steps. `bytes_sent` counts payload bytes as for `CommHook`."""

    bytes_sent: int = 0

    def begin(self, model: nn.Module, process_group: Any) -> None:
        """Called once before the first step, with the replicas' common starting weights
        (e.g. DiLoCo keeps them as the outer optimizer's parameters). Default: nothing."""
        return None

    @abc.abstractmethod
    def after_step(self, model: nn.Module, step: int, process_group: Any) -> None: ...


class Schedule(abc.ABC):
    """A scalar as a function of training progress: learning-rate multiplier and the like.

    `__call__(step, tokens)` returns the value before optimizer step `step` (0-based), when
    `tokens` training tokens have been consumed (schedules whose boundaries are in tokens,
    like DeepSeek-V3's, read `tokens`; step-based ones ignore it). For learning rates the
    value multiplies each parameter group's base `lr`.
    """

    @abc.abstractmethod
    def __call__(self, step: int, tokens: int = 0) -> float: ...


class TrainingData(abc.ABC):
    """What the trainer reads batches from.

    `vocab_size`: token ids are < vocab_size. `batch(split, batch_size=B, seq_len=T, generator=g)`
    returns {"tokens": [B, T], "targets": [B, T] (tokens shifted by one), "doc_ids": [B, T]}
    for split "train" or "val". Optional capabilities are the interfaces below:
    `StatefulData`, `ShardedData`, `PreparedData`, `BytesPerToken`.
    """

    vocab_size: int

    @abc.abstractmethod
    def batch(self, split: str, *, batch_size: int, seq_len: int,
              generator: torch.Generator) -> dict[str, torch.Tensor]: ...


class StatefulData(abc.ABC):
    """Training data with its own read position (a stateful loader), saved in checkpoints so a
    resumed run reads the batches an uninterrupted one would."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedData(abc.ABC):
    """Training data that several data-parallel processes read, each its own share of every
    batch (the shares together are the batch one process would read). The trainer calls
    `read_share(plan.data_parallel)` once the parallel plan is applied and before the first
    batch; until then the data reads the whole batch (`DataShare(0, 1)`)."""

    @abc.abstractmethod
    def read_share(self, share: DataShare) -> None: ...


class PreparedData(abc.ABC):
    """Training data prepared once on disk (cleaned, deduplicated, tokenized) before batches
    can be drawn. With several processes rank 0 prepares; the others wait until `prepared()`
    and then `prepare()` only loads the cache."""

    @abc.abstractmethod
    def prepared(self) -> bool: ...

    @abc.abstractmethod
    def prepare(self) -> Any: ...


class BytesPerToken(abc.ABC):
    """Training data that knows how many bytes of text a token stands for in each split, so a
    validation loss also reads as bits per byte."""

    @abc.abstractmethod
    def bytes_per_token(self, split: str) -> float: ...


class HasTokenizer(abc.ABC):
    """Training data that tokenizes text itself: its tokenizer travels with the run's
    checkpoints and exports, so a trained model can read text without the corpus."""

    @abc.abstractmethod
    def encoding(self) -> Any:
        """The `tiktoken.Encoding` the data's tokens come from (available once prepared)."""


class DataSource(abc.ABC):
    """A stream of raw documents of one domain (code, prose, docs, web, ...).

    `documents()` yields `tessera.components.data.document.Document`s; `domain` names the mixture
    domain they belong to. Sources are plain keyword-only dataclasses, so their repr is the
    fingerprint of what they read.
    """

    domain: str

    @abc.abstractmethod
    def documents(self) -> Iterable[Any]: ...


class DocumentFilter(abc.ABC):
    """One cleaning step: `process(doc)` returns the (possibly rewritten) document, or None
    to reject it; `process_batch(docs)` the same for many. `name` labels its rows in the
    pipeline report."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def process(self, doc: Any) -> Any | None: ...

    def process_batch(self, docs: list[Any]) -> list[Any | None]:
        """`process` of each document, in order; a filter whose work vectorizes across
        documents overrides this (the pipeline calls it on batches of a shard's documents)."""
        return [self.process(doc) for doc in docs]


class DataEngine(abc.ABC):
    """Runs one stage of data preparation: `tasks` independent tasks of a pipeline, somewhere.

    `run(steps=..., tasks=..., logs=..., name=..., input_bytes=...)` runs the pipeline `steps`
    (datatrove pipeline steps) once per task rank in [0, tasks) and returns when all have
    finished (or, for a batch scheduler, when they are queued: then `waits` is False);
    `input_bytes` (the corpus's size, 0 if unknown) may guide how many workers to start. Tasks already marked
    complete under `logs` (a folder every worker can reach) are skipped, so a stage cut short
    continues where it stopped. The result never depends on the engine or its worker count.
    """

    waits: ClassVar[bool] = True

    @abc.abstractmethod
    def run(self, *, steps: list[Any], tasks: int, logs: str, name: str, input_bytes: int = 0) -> None: ...


ParamGroups = Iterable[dict[str, Any]]
"""What an optimizer factory receives: torch-style parameter groups."""

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""A built `OPTIMIZER` partial: call it with `ParamGroups` to get the optimizer."""
