"""Routed experts as stacked weights, computed with one grouped matmul per projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [M, in] sorted by expert (`counts` [E] rows each), times each expert's
    weight [E, out, in]^T -> [M, out].

    Uses `torch._grouped_mm` (one kernel for all experts; no host sync, so it also compiles)
    where this torch has it, else a loop over experts (the correct fallback, slower).
    """
    if hasattr(torch, "_grouped_mm") and x.shape[0] > 0:
        return torch._grouped_mm(x, weight.transpose(-1, -2), offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([chunk @ w.T for chunk, w in zip(x.split(counts.tolist()), weight)], dim=0)


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU experts (DeepSeekMoE fine-grained experts) with weights stacked per projection.

    Tokens are sorted by expert so each projection is one grouped GEMM over contiguous
    row ranges, never a Python loop over experts in the hot path.

    Parameters: w_gate, w_up [E, hidden_dim, dim]; w_down [E, dim, hidden_dim] ([out, in] per
    expert, as nn.Linear stores weights).

    forward(x: [N, D], indices: [N, K], weights: [N, K], keep: [N, K] bool | None) -> [N, D]:
    sum over k of weights[n, k] * expert_{indices[n, k]}(x[n]); assignments with keep=False
    (dropped by a capacity limit) are skipped.
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
        flat_token = torch.arange(n, device=x.device).repeat_interleave(k)
        flat_weight = weights.flatten()
        if keep is not None:
            kept = keep.flatten()
            flat_expert, flat_token, flat_weight = flat_expert[kept], flat_token[kept], flat_weight[kept]
        order = torch.argsort(flat_expert, stable=True)
        token, gate = flat_token[order], flat_weight[order]
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
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
