"""Routed experts as stacked weights, computed with one grouped matmul per projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.moe.grouped_mm import grouped_mm


def expert_counts(flat_expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int64 [E]: assignments per expert. A scatter-add, not `bincount`, whose output length
    depends on the data and so breaks a compiled graph."""
    return torch.zeros(n_experts, dtype=torch.int64, device=flat_expert.device).scatter_add_(
        0, flat_expert, torch.ones_like(flat_expert))


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU experts (DeepSeekMoE fine-grained experts) with weights stacked per projection.

    Tokens are sorted by expert so each projection is one grouped GEMM over contiguous
    row ranges, never a Python loop over experts in the hot path.

    Parameters: w_gate, w_up [E, hidden_dim, dim]; w_down [E, dim, hidden_dim] ([out, in] per
    expert, as nn.Linear stores weights).

    forward(x: [N, D], indices: [N, K], weights: [N, K], keep: [N, K] bool | None) -> [N, D]:
    sum over k of weights[n, k] * expert_{indices[n, k]}(x[n]); assignments with keep=False
    (dropped by a capacity limit) contribute nothing. Every shape is static, so the whole
    forward and backward compile into one graph in fp32 and bf16.
    """

    def __init__(self, *, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        n, k = indices.shape
        flat_expert = indices.flatten()
        flat_weight = weights.flatten()
        if keep is not None:  # dropped assignments weigh 0 (shapes stay static for torch.compile)
            flat_weight = flat_weight * keep.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token, gate = order // k, flat_weight[order]
        counts = expert_counts(flat_expert, self.n_experts)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):  # grouped_mm is not an autocast op: cast explicitly
            xs = x[token].to(dtype)
            hidden = F.silu(grouped_mm(xs, self.w_gate.to(dtype), counts)) * grouped_mm(
                xs, self.w_up.to(dtype), counts)
            out = grouped_mm(hidden, self.w_down.to(dtype), counts) * gate[:, None].to(dtype)
            return torch.zeros(n, self.dim, dtype=dtype, device=x.device).index_add_(0, token, out)

    def reset_parameters(self, *, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w_gate, std=init_std)
        nn.init.normal_(self.w_up, std=init_std)
        nn.init.normal_(self.w_down, std=out_std)
