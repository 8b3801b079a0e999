"""Routed experts as stacked weights, computed with one grouped matmul per projection."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.interfaces import ExpertBank
from tessera.components.model.init import normal_
from tessera.components.moe.grouped_mm import grouped_mm
from tessera.components.moe.routed_swiglu import routed_swiglu
from tessera.components.precision.autocast_state import autocast_dtype, autocast_off


def expert_counts(flat_expert: torch.Tensor, n_experts: int) -> torch.Tensor:
    """int64 [E]: assignments per expert. A scatter-add, not `bincount`, whose output length
    depends on the data and so breaks a compiled graph."""
    return torch.zeros(n_experts, dtype=torch.int64, device=flat_expert.device).scatter_add_(
        0, flat_expert, torch.ones_like(flat_expert))


def swiglu_experts(xs: torch.Tensor, rows: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert: xs [R, D], `rows` int64 [E'] per expert, w_gate and
    w_up [E', F, D], w_down [E', D, F], all in xs's dtype -> [R, D]."""
    return grouped_mm(F.silu(grouped_mm(xs, w_gate, rows)) * grouped_mm(xs, w_up, rows), w_down, rows)


ROW_MULTIPLE = 16
"""CPU, bf16 and fp16: each expert's rows are padded to a multiple of this. oneDNN builds a
kernel for every new GEMM shape; with raw counts, which change every step, a bf16 grouped GEMM
spent ~3/4 of its time building kernels (1.2 ms instead of 0.3 at 4096 x 128 x 96, 8
experts). Rounded counts repeat, so the kernels come from its cache; the padding costs <= 16
rows per expert. The most any layout pads (the planners' bound)."""


def row_multiple(device_type: str, dtype: torch.dtype) -> int:
    """What each expert's row count is padded to for GEMMs in `dtype` on `device_type`:
    `ROW_MULTIPLE` for 16-bit GEMMs on CPU, else 1. fp32 GEMMs on CPU (MKL) build no kernels
    per shape, so padding only adds rows (3% of the debug layer's routed rows)."""
    return ROW_MULTIPLE if device_type == "cpu" and dtype.itemsize < 4 else 1


def padded_layout(sorted_expert: torch.Tensor, n_experts: int, *,
                  multiple: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each expert-sorted assignment goes in a padded row layout.

    sorted_expert: int64 [M], expert ids in ascending order. Returns `rows` int64 [E] (rows of
    each expert: its count rounded up to `multiple`; the last expert also takes the slack),
    `slot` int64 [M] (the row of each assignment), and the total row count, which depends on
    M, E and `multiple` only, so shapes stay static under torch.compile.
    """
    m = sorted_expert.numel()
    counts = expert_counts(sorted_expert, n_experts)
    rows = (counts + multiple - 1) // multiple * multiple
    total = -(-m // multiple) * multiple + n_experts * multiple
    rows = torch.cat([rows[:-1], rows[-1:] + (total - rows.sum())])
    start, padded_start = counts.cumsum(0) - counts, rows.cumsum(0) - rows
    # index_select, not advanced indexing: the latter's general kernel costs ~0.8 ms at 4096 rows
    slot = (padded_start - start).index_select(0, sorted_expert) + torch.arange(m, device=sorted_expert.device)
    return rows, slot, total


UNIFORM_WASTE = 0.15
"""CPU, eager, bf16: the largest share of extra rows (over the grouped layout's) that padding
every expert to the busiest one's count may add. In bf16 one batched GEMM (`bmm`) over equal
row blocks runs at the speed of a dense GEMM of the same FLOPs, while torch._grouped_mm's CPU
path, one oneDNN GEMM per expert, is ~20% slower at 8 experts of ~500 rows (0.64 vs 0.51 ms at
4224 x 128 x 96); the debug MoE layer's forward+backward went from 15.1 to 11.4 ms. In fp32
(MKL) the per-expert GEMMs are within ~10% of bmm, and the padding costs more than that
(21.4 vs 22.9 ms), so fp32 keeps the grouped layout (`UNIFORM_DTYPES`)."""

UNIFORM_DTYPES = (torch.bfloat16,)


def _uniform_allowed(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the uniform layout may be used: its row count depends on the data (a compiled
    graph wants static shapes; reading it is a host sync on an accelerator); see `UNIFORM_WASTE`."""
    return x.device.type == "cpu" and dtype in UNIFORM_DTYPES and not torch.compiler.is_compiling()


def uniform_capacity(counts: torch.Tensor, *, multiple: int) -> int:
    """Rows per expert for one batched GEMM, given `counts` int64 [E] (assignments per expert):
    the busiest expert's count rounded up to `multiple`, or 0 where that pads more than
    `UNIFORM_WASTE` beyond the grouped layout."""
    n_experts = counts.numel()
    capacity = int(counts.max())
    capacity = -(-capacity // multiple) * multiple
    grouped = int(((counts + multiple - 1) // multiple).sum()) * multiple
    return capacity if 0 < capacity * n_experts <= (1 + UNIFORM_WASTE) * grouped else 0


def uniform_layout(sorted_expert: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """int64 [M]: the row of each expert-sorted assignment when expert e owns rows
    [e * capacity, (e + 1) * capacity); `counts` int64 [E], assignments per expert."""
    start = counts.cumsum(0) - counts
    first_row = torch.arange(0, counts.numel() * capacity, capacity, device=counts.device) - start
    return first_row.index_select(0, sorted_expert) + torch.arange(sorted_expert.numel(), device=sorted_expert.device)


class GroupedExperts(nn.Module, ExpertBank):
    """`n_experts` SwiGLU experts (DeepSeekMoE fine-grained experts) with weights stacked per projection.

    Tokens are sorted by expert so each projection is one grouped GEMM over contiguous
    row ranges, never a Python loop over experts in the hot path.

    Parameters: w_gate, w_up [E, hidden_dim, dim]; w_down [E, dim, hidden_dim] ([out, in] per
    expert, as nn.Linear stores weights).

    forward(x: [N, D], indices: [N, K], weights: [N, K], keep: [N, K] bool | None, *, shared)
    -> [N, D]: sum over k of weights[n, k] * expert_{indices[n, k]}(x[n]); assignments with
    keep=False (dropped by a capacity limit) contribute nothing. `shared`: a shared SwiGLU's
    weights (w_gate, w_up [Fs, D], w_down [D, Fs]) whose output is added, computed in the same
    call (not under expert parallelism), or None. Every shape is static, so the whole
    forward and backward compile into one graph in fp32 and bf16.

    `expert_parallel`: None (every expert here), or set by
    `tessera.components.moe.expert_parallel.apply_expert_parallel`, which shards the weights over
    processes and routes the forward through its all-to-all dispatch and combine (an `ExpertBank`).
    """

    def __init__(self, *, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.expert_parallel: Callable[..., torch.Tensor] | None = None
        self.reset_parameters()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                keep: torch.Tensor | None = None, *,
                shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.expert_parallel is not None:
            if shared is not None:
                raise ValueError("shared experts run beside expert-parallel routed experts, not inside them")
            return self.expert_parallel(self, x, indices, weights, keep)
        n, k = indices.shape
        flat_expert = indices.flatten()
        flat_weight = weights.flatten()
        if keep is not None:  # dropped assignments weigh 0 (shapes stay static for torch.compile)
            flat_weight = flat_weight * keep.flatten()
        device = x.device.type
        dtype = autocast_dtype(device) or x.dtype
        sorted_expert, order = torch.sort(flat_expert, stable=True)
        multiple = row_multiple(device, dtype)
        capacity, counts, offsets = 0, None, None
        if _uniform_allowed(x, dtype):  # counted once here for both the capacity and the layout
            counts = expert_counts(sorted_expert, self.n_experts)
            capacity = uniform_capacity(counts, multiple=multiple)
        if capacity or multiple > 1:
            rows, row_token, row_weight = self._padded_rows(sorted_expert, order, flat_weight, capacity, counts,
                                                            n=n, k=k, multiple=multiple)
        else:  # every row an assignment, in expert order: no padding, nothing to place
            rows = counts
            if counts is None:  # each expert's end row, read off the sorted ids (2 launches; count + cumsum: 5)
                offsets = torch.searchsorted(sorted_expert, torch.arange(1, self.n_experts + 1, device=x.device),
                                             out_int32=True)
            row_token, row_weight = order // k, flat_weight.index_select(0, order)
        with autocast_off(device):  # grouped_mm is not an autocast op: cast explicitly
            return routed_swiglu(x.to(dtype), row_token, row_weight.to(dtype), self.w_gate.to(dtype),
                                 self.w_up.to(dtype), self.w_down.to(dtype), rows, capacity=capacity,
                                 shared=None if shared is None else tuple(w.to(dtype) for w in shared),
                                 offsets=offsets)

    def _padded_rows(self, sorted_expert: torch.Tensor, order: torch.Tensor, flat_weight: torch.Tensor,
                     capacity: int, counts: torch.Tensor | None, *, n: int, k: int,
                     multiple: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(rows per expert [E] or None for the uniform layout, token [R] and weight [R] of
        each row) where padding rows sit among the assignments (`padded_layout`, or the uniform
        layout's blocks of `capacity`): they take an extra assignment of weight 0 (the last
        token's, computed and never counted). The weights reach the rows by one index_select,
        whose backward is a cheap index_add (an index_copy's backward ran a slow index_put)."""
        if capacity:
            rows, slot, total = None, uniform_layout(sorted_expert, counts, capacity), self.n_experts * capacity
        else:
            rows, slot, total = padded_layout(sorted_expert, self.n_experts, multiple=multiple)
        row_assign = torch.full((total,), n * k, dtype=torch.int64, device=order.device).index_copy_(0, slot, order)
        row_token = (row_assign // k).clamp_(max=n - 1)
        return rows, row_token, torch.cat([flat_weight, flat_weight.new_zeros(1)]).index_select(0, row_assign)

    def grouped_forward(self, xs: torch.Tensor, rows: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each expert on its rows: xs [R, D] sorted by expert, `rows` int64 [E'] per
        expert, weights (w_gate, w_up, w_down) sliced to those E' experts, in xs's dtype -> [R, D].
        Expert parallelism calls it on the rows it received, with this process's slices."""
        return swiglu_experts(xs, rows, *weights)

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        normal_(self.w_gate, init_std)
        normal_(self.w_up, init_std)
        normal_(self.w_down, out_std)
