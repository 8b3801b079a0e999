"""Top-k expert routers of DeepSeekMoE, DeepSeek-V2 and DeepSeek-V3, with auxiliary-loss-free balancing."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tessera.components.interfaces import OptimizerStepHook, ReportsExpertLoad
from tessera.components.model.init import normal_
from tessera.components.precision.autocast_state import autocast_off
from tessera.registry.invariants import invariant


@dataclasses.dataclass
class Routing:
    """A router's decision for N tokens.

    weights: [N, K] fp32 gate values (already normalised / scaled); indices: [N, K] experts;
    scores: [N, E] fp32 affinities s_{i,t} (softmax or sigmoid, before any bias).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


@invariant("n_experts % n_groups == 0 and topk_groups <= n_groups",
           lambda n_experts, n_groups, topk_groups: n_experts % n_groups == 0 and 1 <= topk_groups <= n_groups,
           fix="split the experts into n_groups equal groups and keep topk_groups <= n_groups")
@invariant("top_k <= experts in the kept groups",
           lambda n_experts, n_groups, topk_groups, top_k: 1 <= top_k <= n_experts // n_groups * topk_groups,
           fix="lower top_k or keep more groups (topk_groups)")
class Router(nn.Module, OptimizerStepHook, ReportsExpertLoad):
    """Scores every expert for each token and keeps the top `top_k`.

    - score_func "softmax" (DeepSeekMoE, V2) or "sigmoid" (V3); logits in fp32.
    - Group-limited routing (V2 device-limited, V3 node-limited): experts form `n_groups`
      groups; a group's score is its max ("max", V2) or the sum of its two best ("top2_sum",
      V3) selection scores; only the best `topk_groups` groups stay eligible.
    - Auxiliary-loss-free balancing (V3): with `expert_bias`, a per-expert fp32 bias is added to
      the scores for *selection only* (gates use unbiased scores). After each optimizer step
      the bias moves by `bias_update_speed` (gamma) towards balance:
      b_i += gamma * sign(mean load - load_i), with the load counted over the whole step
      (every micro-batch, all data-parallel ranks: `load_group`, None for the default process
      group). Never touched by gradients.
    - Gates: the selected scores, optionally renormalised to sum to 1 (`normalize_weights`,
      V3), times `scaling_factor` (V2 16.0, V3 2.5).

    forward(x: [N, D]) -> Routing. `last_load` holds the per-expert token counts of the
    latest completed step (for metrics).
    """

    def __init__(self, *, dim: int, n_experts: int, top_k: int, score_func: Literal["softmax", "sigmoid"] = "softmax",
                 n_groups: int = 1, topk_groups: int = 1, group_score: Literal["max", "top2_sum"] = "max",
                 normalize_weights: bool = False, scaling_factor: float = 1.0, expert_bias: bool = False,
                 bias_update_speed: float = 0.0):
        super().__init__()
        self.dim = dim
        self.n_experts = n_experts
        self.top_k = top_k
        self.score_func = score_func
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.group_score = group_score
        self.normalize_weights = normalize_weights
        self.scaling_factor = scaling_factor
        self.bias_update_speed = bias_update_speed
        self.load_group: Any = None  # processes whose loads the bias update sums (None: the default group)
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        # fp32 buffers: saved in checkpoints, excluded from the optimizer and from autocast.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32) if expert_bias else None)
        self.register_buffer("step_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("last_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> Routing:
        with autocast_off(x.device.type):  # routing decisions stay in fp32 under autocast
            return self._route(x.float())

    def _route(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.weight.float())
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        with torch.no_grad():  # the choice is integer: recording its ops for autograd only costs time
            choice = scores if self.expert_bias is None else scores + self.expert_bias
            if self.n_groups > 1:
                choice = self._group_limited(choice)
            indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.normalize_weights:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        # Activation-checkpoint recomputation must not count twice. Compiled, the count is a buffer
        # mutation applied once per forward (recomputation replays only what gradients need).
        if self.training and (torch.compiler.is_compiling() or not _in_backward()):
            # counted straight into the fp32 buffer (2 ops, not 5): exact up to 2**24 assignments of one
            # expert in one step on one process, where adding 1 stops changing it
            with torch.no_grad():
                flat = indices.flatten()
                self.step_load.scatter_add_(0, flat, torch.ones(flat.shape, dtype=self.step_load.dtype,
                                                                device=flat.device))
        if self.scaling_factor != 1.0:  # a multiply by 1 costs a pass each way over [N, K]
            weights = weights * self.scaling_factor
        return Routing(weights=weights, indices=indices, scores=scores)

    def _group_limited(self, choice: torch.Tensor) -> torch.Tensor:
        """choice [N, E] with the experts outside each token's best `topk_groups` groups at -inf.

        Small-row CPU kernels cost per row, not per element, so this avoids `topk` where a
        max does (a group's top-2 sum is its max plus the max of the rest; one kept group is
        an argmax) and masks through a broadcast view instead of an expanded mask."""
        grouped = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)
        best = grouped.max(-1)
        group_scores = best.values
        if self.group_score == "top2_sum":
            group_scores = group_scores + grouped.scatter(-1, best.indices[..., None], float("-inf")).amax(-1)
        if self.topk_groups == 1:  # every group but the best, by one comparison
            drop = group_scores.argmax(-1, keepdim=True) != torch.arange(self.n_groups, device=choice.device)
        else:
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(
                1, group_scores.topk(self.topk_groups, dim=-1).indices, False)
        return grouped.masked_fill(drop[..., None], float("-inf")).view_as(choice)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Apply the bias update from this step's load, then start counting the next step."""
        load = self.step_load
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=self.load_group)
        if self.expert_bias is not None and self.bias_update_speed and load.sum() > 0:
            self.expert_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.last_load.copy_(load)
        self.step_load.zero_()

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Gate weight Normal(0, init_std) (None: 1/sqrt(dim); the router has no output
        projection, so `out_std` is ignored); the balancing bias and load counts to zero."""
        normal_(self.weight, init_std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        self.step_load.zero_()  # buffers materialised from the meta device hold garbage until now
        self.last_load.zero_()


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed)."""
    return torch._C._current_graph_task_id() != -1


def set_load_group(model: nn.Module, group: Any) -> None:
    """Make every router of `model` sum its expert loads over `group` for the aux-free bias
    update: the processes that hold the same layers with different data (the data-parallel
    group). Needed wherever the default group is more than that: under pipeline parallelism
    another stage's routers would be summed in (its collectives pair with ours in call order),
    and under tensor parallelism each load would be counted tp times (harmless to the sign
    update, wrong in `last_load`)."""
    for module in model.modules():
        if isinstance(module, Router):
            module.load_group = group
