"""Routed SwiGLU experts as one autograd Function: gather, two grouped GEMMs, weighted combine.

Autograd over the plain composition (gather, three grouped GEMMs, SiLU, product, gate
multiply, index_add_) runs and saves one op at a time: the gate and up projections as two
GEMMs (and two more GEMMs and an add for their input gradient), the SiLU output and the
product kept besides their inputs, every expert output gathered twice per assignment for the
weighted combine. Here, per padded row r of the expert-sorted layout:

    h = xs_r @ [W_gate; W_up]_e^T        the gate and up GEMMs (two calls: one of width 2F ran no faster)
    a = silu(h_gate) * h_up * w_r        the routing weight folded in before the down GEMM (F < D)
    out[token_r] += a @ W_down_e^T       one index_add_ over the padded rows

Saved per row, in the compute dtype: xs (D); gate, up, silu, their product and a (5F). The
backward reuses its dead [R, *] buffers rather than allocating new ones (see `backward`).
d w_r = <grad of (a / w_r), silu(h_g) h_u> = <g_r W_down_e, silu(h_g) h_u>, read off the
down projection's input gradient, which is computed anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.components.moe.grouped_mm import grouped_mm_at, grouped_weight_grad


def _mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None, capacity: int) -> torch.Tensor:
    """x [R, in] sorted by expert times each expert's weight [E, out, in]^T -> [R, out]: one
    batched GEMM where every expert has `capacity` rows (capacity > 0), else a grouped one."""
    if capacity:
        return torch.bmm(x.view(weight.shape[0], capacity, -1), weight.transpose(1, 2)).view(x.shape[0], -1)
    return grouped_mm_at(x, weight, offsets)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor | None, capacity: int) -> torch.Tensor:
    """grad_e^T x_e per expert: [R, out], [R, in] -> [E, out, in] (the gradient of `_mm`'s weight)."""
    if capacity:
        n = grad.shape[0] // capacity
        return torch.bmm(grad.view(n, capacity, -1).transpose(1, 2), x.view(n, capacity, -1))
    return grouped_weight_grad(grad, x, offsets)


def _input_grad(grad_gate: torch.Tensor, grad_up: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                offsets: torch.Tensor | None, capacity: int, *, out: torch.Tensor) -> torch.Tensor:
    """grad_gate W_gate_e + grad_up W_up_e per row ([R, F] each, weights [E, F, D]) -> [R, D],
    the uniform layout's first product written into `out` [R, D] (a dead buffer). Each product
    is rounded to the compute dtype before the sum, as in the grouped layout (which the compiled
    graph runs): a GEMM accumulating into the first (baddbmm_) rounds once and would differ."""
    if capacity:
        n = out.shape[0] // capacity
        grad_xs = torch.bmm(grad_gate.view(n, capacity, -1), w_gate, out=out.view(n, capacity, -1))
        return grad_xs.add_(torch.bmm(grad_up.view(n, capacity, -1), w_up)).view(out.shape)
    grad_xs = grouped_mm_at(grad_gate, w_gate.transpose(-1, -2), offsets)
    return grad_xs.add_(grouped_mm_at(grad_up, w_up.transpose(-1, -2), offsets))


class _RoutedSwiGLU(torch.autograd.Function):
    """See `routed_swiglu`."""

    @staticmethod
    def forward(ctx, x, row_token, row_weight, w_gate, w_up, w_down, offsets, capacity):
        xs = x.index_select(0, row_token)
        gate, up = _mm(xs, w_gate, offsets, capacity), _mm(xs, w_up, offsets, capacity)  # [R, F] each
        silu = F.silu(gate)
        act = silu * up
        a = act * row_weight[:, None]
        out = x.new_zeros(x.shape).index_add_(0, row_token, _mm(a, w_down, offsets, capacity))
        ctx.save_for_backward(xs, gate, up, silu, act, a, row_token, row_weight, w_gate, w_up, w_down, offsets)
        ctx.capacity = capacity
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, gate, up, silu, act, a, row_token, row_weight, w_gate, w_up, w_down, offsets = ctx.saved_tensors
        c = ctx.capacity
        # Fresh [R, *] buffers are what this costs beyond its GEMMs (each a first touch of new
        # pages on CPU), so dead ones are reused: the product summed for the weight gradient
        # becomes grad_up, grad_act becomes grad_gate, and (uniform layout) grad_rows grad_xs.
        grad_rows = grad_out.contiguous().index_select(0, row_token)  # [R, D]
        grad_w_down = _weight_grad(grad_rows, a, offsets, c)
        grad_act = _mm(grad_rows, w_down.transpose(-1, -2), offsets, c)  # [R, F], before the weight
        product = grad_act * act
        # a bf16 sum accumulates in fp32 on its own; asking for an fp32 result copied [R, F] first
        grad_weight = product.sum(-1).to(row_weight.dtype)
        grad_act.mul_(row_weight[:, None])
        grad_up = torch.mul(grad_act, silu, out=product)
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_act)
        grad_w_gate = _weight_grad(grad_gate, xs, offsets, c)
        grad_w_up = _weight_grad(grad_up, xs, offsets, c)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_xs = _input_grad(grad_gate, grad_up, w_gate, w_up, offsets, c, out=grad_rows)
            grad_x = grad_out.new_zeros(grad_out.shape).index_add_(0, row_token, grad_xs)
        return grad_x, None, grad_weight, grad_w_gate, grad_w_up, grad_w_down, None, None


def routed_swiglu(x: torch.Tensor, row_token: torch.Tensor, row_weight: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, rows: torch.Tensor | None, *,
                  capacity: int = 0) -> torch.Tensor:
    """sum over rows r with row_token[r] = n of row_weight[r] * SwiGLU_{e(r)}(x[n]) -> [N, D].

    x [N, D]; row_token int64 [R] (the token of each expert-sorted row; padding rows carry any
    token and weight 0); row_weight [R] (the gate of each row); w_gate, w_up [E, F, D];
    w_down [E, D, F]; rows int64 [E] (rows per expert, summing to R > 0), or `capacity` > 0
    rows for every expert (R = E * capacity: one batched GEMM per product). x, row_weight and
    the weights share one dtype (fp32 or bf16), the output's too. Differentiable in x,
    row_weight and the three weights.
    """
    offsets = None if capacity else rows.cumsum(0).to(torch.int32)
    return _RoutedSwiGLU.apply(x, row_token, row_weight, w_gate, w_up, w_down, offsets, capacity)
