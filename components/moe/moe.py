"""DeepSeekMoE feed-forward: shared experts plus fine-grained routed experts."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch.distributed.tensor import DTensor

from tessera.components.interfaces import AuxiliaryLoss, FeedForward, RoutedExperts, TensorParallel
from tessera.components.mlp.gated import SwiGLU
from tessera.components.moe.balance import device_balance_loss, expert_balance_loss
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.router import Router
from tessera.components.parallel.tp_styles import (
    ParallelStyle,
    Placement,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    Replicate,
    ReplicatedCompute,
)
from tessera.components.precision.autocast_state import autocast_dtype
from tessera.registry.invariants import invariant
from tessera.registry.kinds import FEED_FORWARD


def capacity_keep(weights: torch.Tensor, indices: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    """bool [N, K]: which assignments fit each expert's capacity ceil(factor * N * K / E).

    Over capacity, the assignments with the lowest gate values are dropped first (V2 §3.1.2
    drops the lowest-affinity tokens; the capacity is per expert here).
    """
    n, k = indices.shape
    capacity = math.ceil(capacity_factor * n * k / n_experts)
    flat_expert, flat_weight = indices.flatten(), weights.flatten()
    # Order by expert, and within an expert by descending gate; then rank within each expert.
    by_gate = torch.argsort(-flat_weight, stable=True)
    order = by_gate[torch.argsort(flat_expert[by_gate], stable=True)]
    sorted_expert = flat_expert[order]
    starts = torch.searchsorted(sorted_expert, sorted_expert, right=False)
    rank = torch.arange(n * k, device=indices.device) - starts
    keep = torch.empty(n * k, dtype=torch.bool, device=indices.device)
    keep[order] = rank < capacity
    return keep.view(n, k)


def _plain_swiglu(module: torch.nn.Module, *, training: bool) -> bool:
    """Whether `module` computes exactly w_down(silu(w_gate x) * w_up x) from plain weights, so
    the routed experts' Function may compute it instead: a SwiGLU of three plain nn.Linear
    without biases (not fp8's or an adapter's Linear subclass), no active dropout, no module
    hook of its own or global one (which would not fire), and no DTensor weight (tensor
    parallelism shards them and plans their communication)."""
    if type(module) is not SwiGLU or (training and module.dropout.p):
        return False
    linears = (module.w_gate, module.w_up, module.w_down)
    if any(type(m) is not torch.nn.Linear or m.bias is not None or isinstance(m.weight, DTensor) for m in linears):
        return False
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(m, name) for m in (module, *linears) for name in hooks):
        return False
    return not any(getattr(torch.nn.modules.module, f"_global{name}") for name in hooks)


@FEED_FORWARD.register("moe")
@invariant("router, experts and shared experts agree on dim and n_experts",
           lambda dim, router, experts, shared_experts: router.dim == dim and experts.dim == dim
           and router.n_experts == experts.n_experts and (shared_experts is None or shared_experts.dim == dim),
           fix="give router, experts and shared_experts the MoE's dim, and router.n_experts == experts.n_experts")
@invariant("n_experts % n_devices == 0", lambda experts, n_devices: experts.n_experts % n_devices == 0,
           fix="choose n_devices (expert groups for the device-level loss) that divides n_experts")
class MoE(FeedForward, AuxiliaryLoss, RoutedExperts, TensorParallel):
    """h + sum_shared FFN_s(h) + sum_{i in top-k} g_i FFN_i(h) (the residual is added by the block).

    Args:
        dim: model width D.
        router: a `Router` (softmax / sigmoid scores, group-limited top-k, aux-free bias).
        experts: the routed `GroupedExperts`.
        shared_experts: a `FeedForward` every token goes through (DeepSeekMoE's shared
            experts, fused into one of width n_shared * expert width), or None.
        balance_alpha: weight of the expert-level (DeepSeekMoE/V2, softmax) or complementary
            sequence-wise (V3, sigmoid) balance loss; 0 disables it.
        device_balance_alpha, n_devices: weight of V2's device-level loss over `n_devices`
            equal groups of experts.
        capacity_factor: per-expert capacity in training (V2 drops the lowest-gate
            assignments over it); None never drops (V3). Nothing is dropped in eval.

    forward(x: [B, T, D]) -> [B, T, D]. `auxiliary_loss()` returns the weighted balance
    terms of the latest forward; `router.last_load` the per-expert load of the last step.
    As a `RoutedExperts` its routed experts are `experts` (an `ExpertBank`); as a
    `TensorParallel` block it replicates routing and routed experts (`tensor_parallel_plan`).
    """

    tensor_parallel_parts: ClassVar[tuple[str, ...]] = ("shared_experts",)  # split like a gated MLP

    def __init__(self, *, dim: int, router: Router, experts: GroupedExperts, shared_experts: FeedForward | None = None,
                 balance_alpha: float = 0.0, device_balance_alpha: float = 0.0, n_devices: int = 1,
                 capacity_factor: float | None = None):
        super().__init__()
        self.dim = dim
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.balance_alpha = balance_alpha
        self.device_balance_alpha = device_balance_alpha
        self.n_devices = n_devices
        self.capacity_factor = capacity_factor
        self._aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # one view for router and experts: their input gradients meet here and go back through one
        # view (two views made an autograd node each and summed the two [B, T, D] gradients after)
        flat = x.reshape(b * t, d)
        routing = self.router(flat)
        keep = None
        if self.training and self.capacity_factor is not None:
            keep = capacity_keep(routing.weights, routing.indices, self.experts.n_experts, self.capacity_factor)
        compute_dtype = autocast_dtype(x.device.type)
        if compute_dtype is not None:  # cast once for routed and shared experts, not twice
            flat = flat.to(compute_dtype)
        shared = self._shared_weights()
        out = self.experts(flat, routing.indices, routing.weights, keep,
                           **({} if shared is None else {"shared": shared})).view(b, t, d)
        if self.shared_experts is not None and shared is None:
            out = out + self.shared_experts(flat.view(b, t, d))
        self._aux = self._balance(routing, b, t) if self.training else None
        return out

    def _shared_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The shared experts' weights where the routed experts' call can compute them too (a
        plain SwiGLU beside `GroupedExperts` on this process: one Function for both parts, see
        `routed_swiglu`); None where the shared experts run as their own module (a TP-sharded
        or hooked one, a user's own, or beside expert parallelism)."""
        shared = self.shared_experts
        if type(self.experts) is not GroupedExperts or self.experts.expert_parallel is not None:
            return None
        if shared is None or not _plain_swiglu(shared, training=self.training):
            return None
        return shared.w_gate.weight, shared.w_up.weight, shared.w_down.weight

    def _balance(self, routing, b: int, t: int) -> torch.Tensor | None:
        if b * t == 0:  # no token, nothing to balance (the losses' means over tokens would be 0 / 0)
            return None
        terms = []
        scores = routing.scores.view(b, t, -1)
        indices = routing.indices.view(b, t, -1)
        if self.balance_alpha:
            terms.append(self.balance_alpha * expert_balance_loss(scores, indices))
        if self.device_balance_alpha:
            terms.append(self.device_balance_alpha * device_balance_loss(scores, indices, self.n_devices))
        return sum(terms) if terms else None

    def auxiliary_loss(self) -> torch.Tensor | None:
        return self._aux

    @property
    def routed_experts(self) -> GroupedExperts:
        return self.experts

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def expert_parallel_faults(self, ep: int) -> list[str]:
        """Group-limited routing's groups (V2 device-limited, V3 node-limited) must not straddle
        processes: n_groups is a multiple of ep (several groups per process) or divides it (a
        group spans whole processes, V3's node of 8 GPUs); V2's device-level balance loss must
        balance the ep processes: n_devices == ep."""
        faults: list[str] = []
        e, groups = self.experts.n_experts, self.router.n_groups
        if ep > 1 and groups > 1 and groups % ep and ep % groups:
            fits = [d for d in range(1, e + 1) if e % d == 0 and (groups % d == 0 or d % groups == 0)]
            faults.append(f"group-limited routing's {groups} groups (router.n_groups) do not align with ep={ep} "
                          f"processes: each group should be a process (or several whole ones, V3's node), so "
                          f"choose ep dividing or a multiple of {groups} (here: {fits}), or regroup the experts")
        if ep > 1 and self.device_balance_alpha and self.n_devices != ep:
            faults.append(f"the device-level balance loss balances n_devices={self.n_devices} groups but the "
                          f"experts are sharded over ep={ep} processes; set n_devices={ep} "
                          f"(DeepSeek-V2 arXiv:2405.04434 §2.2.3: one group per device)")
        return faults

    def tensor_parallel_plan(self, *, output_layout: Placement) -> dict[str, ParallelStyle]:
        """The simplest correct split: every tp rank gathers the whole sequence (the "" entry
        takes the residual stream's `output_layout` in), routes every token (the router sees
        full hidden states) and runs every routed expert on it (replicated weights: no
        communication inside, tp-fold redundant expert compute), then keeps its `output_layout`
        part of the output. The shared experts split like a gated MLP. To divide the routed
        experts' work, use expert parallelism (`ep`)."""
        plan: dict[str, ParallelStyle] = {
            # replicated plain input whose gradient is whole on each rank; the output goes back to the stream
            "": PrepareModuleInputOutput(input_layouts=(output_layout,), desired_input_layouts=(Replicate(),),
                                         use_local_input=True, output_layouts=(Replicate(),),
                                         desired_output_layouts=(output_layout,), use_local_output=False),
            "router": ReplicatedCompute(),
            "experts": ReplicatedCompute(),
        }
        if self.shared_experts is not None:
            shared = self.shared_experts.tensor_parallel_plan(output_layout=Replicate())
            plan.update({f"shared_experts.{name}" if name else "shared_experts": style
                         for name, style in shared.items()})
            plan["shared_experts"] = PrepareModuleOutput(output_layouts=(Replicate(),),
                                                         desired_output_layouts=(Replicate(),), use_local_output=True)
        return plan

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Router gate and expert inputs with `init_std`, expert outputs with `out_std` (None: defaults).

        Nothing of its own to draw: the router and experts initialise themselves when built."""
        self.router.reset_parameters(init_std=init_std)
        self.experts.reset_parameters(init_std=init_std, out_std=out_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(init_std=init_std, out_std=out_std)
