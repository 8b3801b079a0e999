"""Routed (and shared) SwiGLU experts as one autograd Function: gather, grouped GEMMs, combine.

Autograd over the plain composition (gather, three grouped GEMMs, SiLU, product, gate
multiply, index_add_) runs and saves one op at a time: the gate and up projections as two
GEMMs (and two more GEMMs and an add for their input gradient), the SiLU output and the
product kept besides their inputs, every expert output gathered twice per assignment for the
weighted combine. Here, per padded row r of the expert-sorted layout:

    [h_gate, h_up] = xs_r @ [W_gate; W_up]_e^T   one GEMM of width 2F for both projections
    a = silu(h_gate) * h_up * w_r                the routing weight folded in before the down GEMM (F < D)
    out[token_r] += a @ W_down_e^T               one index_add_ over the padded rows

In fp32 the gate and up projections are one GEMM over a stacked [E, 2F, D] weight (built per
call, not saved), and their input gradient one GEMM of depth 2F (no add): 4 GEMMs in the
backward instead of 6 (`FUSED_GATE_UP_DTYPES`; 16-bit experts run two).

A MoE's shared experts (a plain SwiGLU every token passes) run in the same call as one more
part, on x itself (no gather, weight 1): the routed rows are added into its output, and the
routed input gradient into its input gradient, so neither a zero-filled buffer nor a sum of
the two parts' outputs or gradients is made, and one Function's overhead is paid, not two.

Saved per row of each part, in the compute dtype: xs (D); gate and up (2F), silu, their
product and a (3F). The backward only reads them (a pipeline schedule that splits the
backward into input and weight gradients runs it twice) and allocates one [R, F] or [R, 2F]
buffer per part beyond its GEMMs' outputs (see `_part_backward`). It has no graph of its
own: second derivatives are refused.
d w_r = <grad of (a / w_r), silu(h_g) h_u> = <g_r W_down_e, silu(h_g) h_u>, read off the
down projection's input gradient, which is computed anyway."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.components.moe.grouped_mm import grouped_mm_at, grouped_weight_grad


def _mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None, capacity: int, *,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, in] sorted by expert times each expert's weight [E, out, in]^T -> [R, out]: one
    batched GEMM where every expert has `capacity` rows (capacity > 0), written into `out` [R,
    out] where given (a dead buffer), else a grouped one (which allocates its result)."""
    if capacity:
        n = weight.shape[0]
        if n == 1:  # one expert (the shared part): the plain GEMM nn.Linear runs
            return torch.mm(x, weight[0].t(), out=out)
        result = None if out is None else out.view(n, capacity, -1)
        return torch.bmm(x.view(n, capacity, -1), weight.transpose(1, 2), out=result).view(x.shape[0], -1)
    return grouped_mm_at(x, weight, offsets)


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor | None, capacity: int) -> torch.Tensor:
    """grad_e^T x_e per expert: [R, out], [R, in] -> [E, out, in] (the gradient of `_mm`'s weight)."""
    if capacity:
        n = grad.shape[0] // capacity
        if n == 1:
            return (grad.t() @ x)[None]
        return torch.bmm(grad.view(n, capacity, -1).transpose(1, 2), x.view(n, capacity, -1))
    return grouped_weight_grad(grad, x, offsets)


FUSED_GATE_UP_DTYPES = (torch.float32,)
"""Compute dtypes whose gate and up projections run on CPU as one GEMM of width 2F into one
[R, 2F] buffer. In fp32 (MKL, AVX2 Zen 3) that beats two GEMMs of width F by 6-11% each way
(not measured on GPUs, which keep two GEMMs and no per-call weight copy). In bf16
(oneDNN, AVX512-BF16 Zen 4) SiLU and its backward on the buffer's strided halves took 2.6x as
long as on contiguous tensors and the layer ran no faster (0.97-1.03), so 16-bit experts run
two GEMMs into two buffers."""


def _part_forward(xs: torch.Tensor, row_weight: torch.Tensor | None, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, offsets: torch.Tensor | None, capacity: int):
    """One part's rows through its experts: xs [R, D], row_weight [R] or None (weight 1) ->
    (its rows' outputs [R, D], what its backward needs: (xs, h, None, silu, act, a) where
    h = [gate | up] [R, 2F] is one GEMM's output (`FUSED_GATE_UP_DTYPES`), else
    (xs, gate, up, silu, act, a))."""
    if xs.dtype in FUSED_GATE_UP_DTYPES and xs.device.type == "cpu":
        h = _mm(xs, torch.cat([w_gate, w_up], 1), offsets, capacity)
        first, up, (gate, up_values) = h, None, h.split(w_gate.shape[1], dim=1)
    else:
        first = gate = _mm(xs, w_gate, offsets, capacity)
        up = up_values = _mm(xs, w_up, offsets, capacity)
    silu = F.silu(gate)
    act = silu * up_values
    a = act if row_weight is None else act * row_weight[:, None]
    return _mm(a, w_down, offsets, capacity), (xs, first, up, silu, act, a)


def _scratch(grad_act: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's one fresh [R, *] buffer and its [R, F] part that takes the product summed
    for the routing weight's gradient: fused, the gradient of [gate | up] [R, 2F] (the product
    goes to its up half, written last); else [R, F] for the gradient of up."""
    if not fused:
        spare = torch.empty_like(grad_act)
        return spare, spare
    grad_h = grad_act.new_empty(grad_act.shape[0], 2 * grad_act.shape[1])
    return grad_h, grad_h[:, grad_act.shape[1]:]


def _gate_up_grads(grad_a: torch.Tensor, saved: tuple, scratch: torch.Tensor, *, fused: bool):
    """Given grad_a [R, F], the gradient of silu(gate) * up: fused (saved h = [gate | up]),
    the gradient [R, 2F] of h, written into `scratch`; else (grad gate, grad up), written into
    grad_a and `scratch`. A traced graph, where buffers are the compiler's to plan (and `out=`
    must be contiguous), computes them afresh."""
    _, first, up, silu, _, _ = saved
    gate, up = first.split(silu.shape[1], dim=1) if fused else (first, up)
    if torch.compiler.is_compiling():
        grads = torch.ops.aten.silu_backward(grad_a * up, gate), grad_a * silu
        return torch.cat(grads, 1) if fused else grads
    if fused:
        grad_gate, grad_up = scratch.split(silu.shape[1], dim=1)
        torch.mul(grad_a, up, out=grad_gate)
        torch.mul(grad_a, silu, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return scratch
    grad_up = torch.mul(grad_a, silu, out=scratch)
    return torch.ops.aten.silu_backward.grad_input(grad_a.mul_(up), gate, grad_input=grad_a), grad_up


def _gate_up_backward(grad_a: torch.Tensor, saved: tuple, scratch: torch.Tensor, w_gate: torch.Tensor,
                      w_up: torch.Tensor, offsets: torch.Tensor | None, capacity: int, *, fused: bool,
                      input_grad: bool, spare: torch.Tensor | None):
    """(grad xs [R, D] or None, grad w_gate, grad w_up) given grad_a [R, F], the gradient of
    silu(gate) * up; grad xs written into `spare` [R, D] where given."""
    xs = saved[0]
    grads = _gate_up_grads(grad_a, saved, scratch, fused=fused)
    if fused:  # one GEMM each way over [gate | up]
        grad_w = _weight_grad(grads, xs, offsets, capacity)  # [E, 2F, D]
        grad_xs = None
        if input_grad:
            grad_xs = _mm(grads, torch.cat([w_gate, w_up], 1).transpose(-1, -2), offsets, capacity, out=spare)
        # each half copied: as views of one GEMM's output, gate and up's gradients would share
        # storage (autograd keeps a contiguous one as .grad) or be cloned by autograd anyway
        return (grad_xs, *(g.clone(memory_format=torch.contiguous_format) for g in grad_w.split(w_gate.shape[1], 1)))
    grad_gate, grad_up = grads
    grad_xs = None
    if input_grad:  # each product rounded before the sum in both layouts (the compiled graph's order)
        grad_xs = _mm(grad_gate, w_gate.transpose(-1, -2), offsets, capacity, out=spare)
        grad_xs = grad_xs.add_(_mm(grad_up, w_up.transpose(-1, -2), offsets, capacity))
    return (grad_xs, _weight_grad(grad_gate, xs, offsets, capacity), _weight_grad(grad_up, xs, offsets, capacity))


def _part_backward(grad_rows: torch.Tensor, saved: tuple, row_weight: torch.Tensor | None, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, offsets: torch.Tensor | None, capacity: int, *,
                   input_grad: bool, spare: torch.Tensor | None):
    """The gradients of `_part_forward` given its output rows' gradient grad_rows [R, D]:
    (grad of xs [R, D] or None, of row_weight [R] or None, of w_gate, w_up, w_down). `spare`:
    a dead [R, D] buffer for grad xs, or None. The saved activations are only read: a backward
    split into input and weight gradients (DualPipeV) runs this twice on them."""
    act, a = saved[4], saved[5]
    # Fresh [R, *] buffers are what this costs beyond its GEMMs (each a first touch of new
    # pages on CPU), so there is one (`_scratch`), and grad_act is reused in place.
    grad_w_down = _weight_grad(grad_rows, a, offsets, capacity)
    grad_act = _mm(grad_rows, w_down.transpose(-1, -2), offsets, capacity)  # [R, F], before the weight
    fused = saved[2] is None  # `_part_forward` saved h = [gate | up] and no separate up
    scratch, product_buffer = _scratch(grad_act, fused=fused)
    grad_weight = None
    if row_weight is not None:
        compiling = torch.compiler.is_compiling()
        product = grad_act * act if compiling else torch.mul(grad_act, act, out=product_buffer)
        # a bf16 sum accumulates in fp32 on its own; asking for an fp32 result copied [R, F] first
        grad_weight = product.sum(-1).to(row_weight.dtype)
        grad_act = grad_act * row_weight[:, None] if compiling else grad_act.mul_(row_weight[:, None])
    grad_xs, grad_w_gate, grad_w_up = _gate_up_backward(grad_act, saved, scratch, w_gate, w_up, offsets, capacity,
                                                        fused=fused, input_grad=input_grad, spare=spare)
    return grad_xs, grad_weight, grad_w_gate, grad_w_up, grad_w_down


class _RoutedSwiGLU(torch.autograd.Function):
    """See `routed_swiglu`."""

    @staticmethod
    def forward(ctx, x, row_token, row_weight, w_gate, w_up, w_down, offsets, capacity, s_gate, s_up, s_down):
        ctx.empty = x.shape[0] == 0
        if ctx.empty:  # no token (an empty batch): an empty output, zero weight gradients as nn.Linear's
            ctx.save_for_backward(x, row_weight, w_gate, w_up, w_down, s_gate, s_up, s_down)
            return x.new_zeros(x.shape)
        out, saved = None, ()
        if s_gate is not None:  # the shared part: every token one row, in order; its weights as one expert
            out, saved = _part_forward(x, None, s_gate[None], s_up[None], s_down[None], None, x.shape[0])
        rows, routed_saved = _part_forward(x.index_select(0, row_token), row_weight, w_gate, w_up, w_down,
                                           offsets, capacity)
        out = (x.new_zeros(x.shape) if out is None else out).index_add_(0, row_token, rows)
        ctx.save_for_backward(*routed_saved, row_token, row_weight, w_gate, w_up, w_down, offsets,
                              *saved, s_gate, s_up, s_down)
        ctx.capacity = capacity
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("the MoE experts are differentiable once: their backward has no graph of its own, "
                               "so second derivatives (backward with create_graph=True, as Sophia-H's "
                               "Hessian-vector products take) do not pass a MoE layer")
        saved = ctx.saved_tensors
        if ctx.empty:  # every gradient zero
            x, row_weight, *weights = saved
            zeros = [None if w is None else torch.zeros_like(w) for w in weights]
            return (torch.zeros_like(x), None, torch.zeros_like(row_weight), *zeros[:3], None, None, *zeros[3:])
        routed, (row_token, row_weight, w_gate, w_up, w_down, offsets) = saved[:6], saved[6:12]
        shared, (s_gate, s_up, s_down) = saved[12:-3], saved[-3:]
        grad_out = grad_out.contiguous()
        needs_x = ctx.needs_input_grad[0]
        grad_x, grad_shared = None, (None, None, None)
        if s_gate is not None:
            grad_x, _, *grad_shared = _part_backward(grad_out, shared, None, s_gate[None], s_up[None], s_down[None],
                                                     None, grad_out.shape[0], input_grad=needs_x, spare=None)
            grad_shared = [g[0] for g in grad_shared]  # [1, out, in] -> the nn.Linear weight's [out, in]
        grad_rows = grad_out.index_select(0, row_token)  # [R, D]
        grad_xs, grad_weight, *grad_routed = _part_backward(
            grad_rows, routed, row_weight, w_gate, w_up, w_down, offsets, ctx.capacity, input_grad=needs_x,
            spare=grad_rows)
        if needs_x:
            grad_x = (grad_out.new_zeros(grad_out.shape) if grad_x is None else grad_x).index_add_(
                0, row_token, grad_xs)
        return (grad_x, None, grad_weight, *grad_routed, None, None, *grad_shared)


def routed_swiglu(x: torch.Tensor, row_token: torch.Tensor, row_weight: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, rows: torch.Tensor | None, *,
                  capacity: int = 0, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """sum over rows r with row_token[r] = n of row_weight[r] * SwiGLU_{e(r)}(x[n]) -> [N, D],
    plus SwiGLU_shared(x[n]) for every token when `shared` is given.

    x [N, D]; row_token int64 [R] (the token of each expert-sorted row; padding rows carry any
    token and weight 0); row_weight [R] (the gate of each row); w_gate, w_up [E, F, D];
    w_down [E, D, F]; rows int64 [E] (rows per expert, summing to R > 0), or `capacity` > 0
    rows for every expert (R = E * capacity: one batched GEMM per product), or None with
    `offsets` int32 [E] (each expert's end row, the cumulative rows) given instead; shared: the shared
    SwiGLU's nn.Linear weights (w_gate, w_up [Fs, D], w_down [D, Fs]), or None. x, row_weight
    and the weights share one dtype (fp32 or bf16), the output's too. Differentiable once, in x,
    row_weight and every weight. N = 0 (an empty batch) gives [0, D] and zero weight gradients,
    whatever the rows say.
    """
    if offsets is None and not capacity:
        offsets = rows.cumsum(0).to(torch.int32)
    # 2-D into the Function: a [None] view taken here would be an autograd node per weight each way
    s_gate, s_up, s_down = (None, None, None) if shared is None else shared
    return _RoutedSwiGLU.apply(x, row_token, row_weight, w_gate, w_up, w_down, offsets, capacity,
                               s_gate, s_up, s_down)
