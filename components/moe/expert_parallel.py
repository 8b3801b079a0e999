"""Expert parallelism: the routed experts of every MoE layer sharded over `ep` processes, tokens
sent to the process holding their expert and the results sent back (all-to-all dispatch and
combine, GShard arXiv:2006.16668 §2.2; DeepSeek-V2 arXiv:2405.04434 §3.1.3 and DeepSeek-V3
arXiv:2412.19437 §3.2 train with it).

Layout. `ep` is carved out of the data-parallel processes (as torchtitan does): the `ep`
processes of one expert group see different tokens, and process r of the group holds experts
[r E/ep, (r+1) E/ep) of every MoE layer. Expert weights are DTensors `Shard(0)` on the ep
mesh, so a checkpoint (DCP) stores each whole [E, ...] tensor and loads into any other layout
or a single process, and `sharding.materialize_sharded` initialises them exactly as one
process would. Each expert weight lives whole on its owner (sharded over `ep` only, as
DeepSeek lays them out); FSDP/DDP must leave them alone (`expert_parameters`), because their
gradients are reduced here:

- gradient of a local expert = sum over the ep group's tokens routed to it (the all-to-all's
  backward brings every sender's contribution home), times 1/ep, accumulated over the step's
  micro-batches, then averaged over `replica_mesh` (the processes holding the same experts with
  other data: torchtitan's ["dp_replicate", "efsdp"]) once per step by
  `reduce_expert_gradients` - in all, the mean over every data-parallel process, as FSDP/DDP
  give the other parameters, with one all-reduce per step as DDP's accumulation has.

Routing stays where it was: each process routes its own tokens; the aux-free bias update
all-reduces the per-expert counts over `load_group` (every data-parallel process), so every
process's bias is the single-process run's. The balance losses are per sequence (means over
sequences), so data parallelism averaging them is exactly the whole batch's loss.

The dispatch needs the per-destination counts on the host (uneven splits), so the MoE layer
is not capturable as one static torch.compile graph under EP (the single-process path is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from tessera.components.interfaces import ExpertBank, RoutedExperts
from tessera.components.moe.experts import expert_counts, padded_layout, row_multiple, swiglu_experts
from tessera.components.moe.router import set_load_group
from tessera.components.parallel.process_group import average_in_place
from tessera.components.precision.autocast_state import autocast_dtype, autocast_off


# -- the three local pieces: plan the dispatch, run the local experts, combine --------------------
@dataclasses.dataclass
class Dispatch:
    """Where one process's token-expert assignments go.

    token: int64 [M] the token each sent row copies, rows ordered by expert (so by
    destination); gate: [M] the row's gate value; counts: int64 [E] rows per expert;
    splits: rows per destination process (a host list of `ep` ints).
    """

    token: torch.Tensor
    gate: torch.Tensor
    counts: torch.Tensor
    splits: list[int]


def plan_dispatch(indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None, *,
                  n_experts: int, ep: int) -> Dispatch:
    """Sort the assignments of `indices` [N, K] (gates `weights` [N, K]) by expert; those with
    keep=False (over capacity) are not sent at all."""
    n, k = indices.shape
    flat_expert, gate = indices.flatten(), weights.flatten()
    token = torch.arange(n * k, device=indices.device) // k
    if keep is not None:
        kept = keep.flatten().nonzero().squeeze(1)
        flat_expert, gate, token = flat_expert[kept], gate[kept], token[kept]
    order = torch.argsort(flat_expert, stable=True)
    counts = expert_counts(flat_expert, n_experts)
    return Dispatch(token=token[order], gate=gate[order], counts=counts,
                    splits=counts.view(ep, n_experts // ep).sum(1).tolist())


def local_experts(rows: torch.Tensor, counts: torch.Tensor, *weights: torch.Tensor,
                  compute: Callable[..., torch.Tensor] = swiglu_experts) -> torch.Tensor:
    """This process's experts on the rows it received.

    rows: [R, D] as received: grouped by source process, within a source by local expert;
    counts: int64 [sources, E_local] rows per (source, local expert); weights: this process's
    [E_local, ...] slices (in the compute dtype); compute: an `ExpertBank.grouped_forward`
    (default: `GroupedExperts`' SwiGLU). Returns [R, D] in the same row order.
    """
    n_local = counts.shape[1]
    row_expert = torch.arange(n_local, device=rows.device).repeat(counts.shape[0]).repeat_interleave(
        counts.flatten(), output_size=rows.shape[0])
    order = torch.argsort(row_expert, stable=True)  # expert-major, each expert's rows by source
    padded, slot, total = padded_layout(row_expert[order], n_local,
                                        multiple=row_multiple(rows.device.type, rows.dtype))
    source_row = torch.zeros(total, dtype=torch.int64, device=rows.device).index_copy_(0, slot, order)
    # padding rows repeat row 0 (their outputs are never read); a process no token was routed to
    # pads from a zero row, and still runs its experts so their gradient is zero, not missing
    # (appended to `rows`, not instead of it: `rows` must stay in the graph, or this process
    # would skip the dispatch all-to-all's backward that its peers wait in)
    source = rows if rows.shape[0] else torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    xs = source.index_select(0, source_row)
    out = compute(xs, padded, *weights).index_select(0, slot)
    return torch.empty_like(out).index_copy(0, order, out)


def combine(returned: torch.Tensor, dispatch: Dispatch, n_tokens: int) -> torch.Tensor:
    """[N, D]: each token's returned expert outputs [M, D] weighted by their gates and summed."""
    weighted = returned * dispatch.gate[:, None].to(returned.dtype)
    return returned.new_zeros(n_tokens, returned.shape[1]).index_add_(0, dispatch.token, weighted)


# -- collectives with gradients -------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _ExpertGradient(torch.autograd.Function):
    """Identity forward; backward scales a local expert weight's gradient by 1/ep (the mean over
    the ep group's processes; see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad * ctx.scale, None


# -- the distributed forward ----------------------------------------------------------------------
class ExpertParallel:
    """What an `ExpertBank` (e.g. `GroupedExperts`) needs to run sharded: the ep process group
    (its size `ep`), the group of its replicas (or None), and the row counts of the last forward
    (for tests and metrics: `sent` / `received` rows per peer process)."""

    def __init__(self, *, group: Any, replicas: Any = None):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.replicas = replicas
        self.sent: list[int] = []
        self.received: list[int] = []

    def __call__(self, experts: ExpertBank, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 keep: torch.Tensor | None) -> torch.Tensor:
        """The bank's forward on this process's tokens x [N, D] with its experts' shard."""
        n_local = experts.n_experts // self.ep
        plan = plan_dispatch(indices, weights, keep, n_experts=experts.n_experts, ep=self.ep)
        counts = _all_to_all(plan.counts, [n_local] * self.ep, [n_local] * self.ep, self.group).view(self.ep, n_local)
        received = counts.sum(1).tolist()
        self.sent, self.received = plan.splits, received
        device = x.device.type
        dtype = autocast_dtype(device) or x.dtype
        with autocast_off(device):  # grouped_mm is not an autocast op: cast explicitly
            rows = _AllToAll.apply(x.index_select(0, plan.token).to(dtype), received, plan.splits, self.group)
            local = [_ExpertGradient.apply(_local(w), 1.0 / self.ep).to(dtype)
                     for w in experts.parameters(recurse=False)]  # type: ignore[attr-defined]
            out = _AllToAll.apply(local_experts(rows, counts, *local, compute=experts.grouped_forward),
                                  plan.splits, received, self.group)
            return combine(out, plan, x.shape[0])


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module) -> None:
    """Average the accumulated gradients of `model`'s sharded experts over the processes holding
    the same experts (their `replicas` group), one flat all-reduce per group: call once per
    step, after the last micro-batch's backward and before clipping (the mesh plan does).
    Nothing to do when ep covers every data-parallel process."""
    by_group: dict[Any, list[torch.Tensor]] = {}
    for module in model.modules():
        parallel = getattr(module, "expert_parallel", None)
        if isinstance(parallel, ExpertParallel) and parallel.replicas is not None:
            by_group.setdefault(parallel.replicas, []).extend(
                _local(p.grad) for p in module.parameters(recurse=False) if p.grad is not None)
    for group, grads in by_group.items():
        average_in_place(grads, group)


# -- applying it to a model -----------------------------------------------------------------------
def expert_parallel_faults(model: nn.Module, ep: int) -> list[str]:
    """Why `model` cannot run with expert-parallel degree `ep` (empty: it can), each fault
    naming the MoE layer by its config path (`model.layers[1].feed_forward`), the constraint
    and a fix.

    A MoE layer is any `RoutedExperts` module (ours or a plugin's). For each: `ep` divides its
    routed experts; for ep > 1 its `routed_experts` is an `ExpertBank` (stacked weights the
    dispatch can shard); and the layer's own `expert_parallel_faults(ep)` (ours: group-limited
    routing's groups do not straddle processes, V2's device-level loss balances the ep
    processes). ep > 1 on a model without MoE layers is a fault too: there is nothing to shard.
    """
    if ep < 1:
        return [f"ep={ep}: the expert-parallel degree is at least 1"]
    layers = _layers(model)
    if ep > 1 and not layers:
        return [f"ep={ep} but the model has no MoE layer: expert parallelism shards routed experts and this "
                f"model has none; use ep=1, or a model with MoE feed-forwards"]
    faults = []
    for path, module in layers:
        e = module.n_experts
        if e % ep:
            faults.append(f"{path}: ep={ep} does not divide its {e} routed experts (experts.n_experts): "
                          f"each process holds n_experts / ep of them; choose ep among the divisors of {e}: "
                          f"{[d for d in range(1, e + 1) if e % d == 0]}")
        faults += _bank_faults(path, module) if ep > 1 else []
        faults += [f"{path}: {fault}" for fault in module.expert_parallel_faults(ep)]
    return faults


def _layers(model: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """Every MoE layer of `model` with its config path (layers.1.feed_forward -> model.layers[1].feed_forward)."""
    return [("model" + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split(".") if part),
             module) for name, module in model.named_modules() if isinstance(module, RoutedExperts)]


def _bank_faults(path: str, module: RoutedExperts) -> list[str]:
    bank = module.routed_experts
    if isinstance(bank, ExpertBank):
        return []
    return [f"{path}: its routed experts are a {type(bank).__name__}, which is not an ExpertBank "
            f"(tessera.components.interfaces): expert parallelism shards stacked [n_experts, ...] weights "
            f"and runs them on the rows it receives; implement ExpertBank or use ep=1"]


def _banks(model: nn.Module) -> list[nn.Module]:
    """The routed experts of every MoE layer of `model` (main layers and MTP blocks), once each."""
    banks = {id(m.routed_experts): m.routed_experts for m in model.modules() if isinstance(m, RoutedExperts)}
    return list(banks.values())


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The routed experts' weights: FSDP2's `ignored_params` (DDP: parameters to ignore) when
    experts are sharded by `apply_expert_parallel`, which reduces their gradients itself."""
    return {p for bank in _banks(model) for p in bank.parameters(recurse=False)}


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, *, replica_mesh: DeviceMesh | None = None,
                          load_group: Any = None) -> None:
    """Shard the routed experts (`RoutedExperts.routed_experts`, an `ExpertBank`) of every MoE
    layer of `model` (main layers and MTP blocks) over the 1-D `ep_mesh`, in place.

    Call on the model while it is still on the meta device, before FSDP (`fully_shard` with
    `ignored_params=expert_parameters(model)`) or DDP (ignoring the same parameters), then
    initialise with `sharding.materialize_sharded` (full weights in single-process order,
    each process keeping its experts). `replica_mesh`: the processes holding the same experts
    with other data (torchtitan's ["dp_replicate", "efsdp"], 1-D or 2-D; None when ep covers
    every data-parallel process). `load_group`: the processes whose expert loads the aux-free bias
    update sums (every data-parallel process: `router.set_load_group`; None leaves the routers
    as they are, on the default group, right when every process is data-parallel). Raises
    ValueError with `expert_parallel_faults`' reasons.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_expert_parallel: ep_mesh must be 1-D, got dims {ep_mesh.mesh_dim_names}")
    ep = ep_mesh.size()
    # ep=1 (experts replicated over replica_mesh) still makes the banks' weights DTensors
    faults = expert_parallel_faults(model, ep) if ep > 1 else [f for p, m in _layers(model) for f in _bank_faults(p, m)]
    if faults:
        raise ValueError("expert parallelism cannot shard this model: " + "; ".join(faults))
    replicas = None
    if replica_mesh is not None and replica_mesh.size() > 1:  # (dp_replicate, efsdp) under HSDP: one group
        replicas = (replica_mesh if replica_mesh.ndim == 1 else replica_mesh._flatten()).get_group()
    if load_group is not None:
        set_load_group(model, load_group)
    for bank in _banks(model):
        for name, param in list(bank.named_parameters(recurse=False)):
            local = param.detach().chunk(ep, dim=0)[ep_mesh.get_local_rank()].clone()
            sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                         shape=param.shape, stride=param.stride())
            setattr(bank, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        bank.expert_parallel = ExpertParallel(group=ep_mesh.get_group(), replicas=replicas)
