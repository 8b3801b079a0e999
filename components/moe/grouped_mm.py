"""One grouped matmul for all routed experts, as an operator torch.compile can trace in any dtype.

`torch._grouped_mm` computes every expert's GEMM over its contiguous rows in one call, with
no host sync. Its meta kernel, which torch.compile traces with, accepts only bf16 inputs, so
a model calling it directly cannot compile in fp32, the only fast precision on CPUs without
native bf16. Wrapping it in a custom operator with our own shape function and backward makes
it opaque to the compiler: the graph keeps one call, in fp32 or bf16, with no graph break,
and eager mode runs the same kernel.
"""

from __future__ import annotations

import torch


def _aligned(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm wants every row stride a multiple of 16 bytes (true for the usual
    widths: multiples of 8 in bf16, of 4 in fp32)."""
    return all(s * t.element_size() % 16 == 0 for t in tensors for s in t.stride() if s != 1)


def _grouped_mm_kernel(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """What `tessera::grouped_mm` runs: x [M, in] times each expert's weight [E, out, in]^T."""
    weight_t = weight.transpose(-1, -2)
    if _aligned(x, weight_t):
        return torch._grouped_mm(x, weight_t, offs=offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # odd widths: one GEMM per expert
    return torch.cat([chunk @ w for chunk, w in zip(x.split(counts), weight_t)])


@torch.library.custom_op("tessera::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_kernel(x, weight, offsets)


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def _weight_grad_kernel(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """d W_e = g_e^T x_e for every expert: a grouped GEMM over the rows (K) dimension, which
    gives an empty expert a zero gradient. g^T goes in as a transposed view (a copy costs
    more than the GEMM's strided reads: 0.49 vs 0.36 ms in bf16 at 4224 x 96 x 128)."""
    grad_out_t = grad_out.t()
    if _aligned(grad_out_t, x):
        return torch._grouped_mm(grad_out_t, x, offs=offsets)
    bounds = [0, *offsets.tolist()]
    return torch.stack([grad_out_t[:, a:b] @ x[a:b] for a, b in zip(bounds, bounds[1:])])


@torch.library.custom_op("tessera::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _weight_grad_kernel(grad_out, x, offsets)


@_weight_grad_op.register_fake
def _(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return grad_out.new_empty(offsets.shape[0], grad_out.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _backward(ctx, grad_out: torch.Tensor):
    x, weight, offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    # Both through custom operators: traced, torch._grouped_mm's own meta kernel would refuse fp32.
    grad_x = _grouped_mm_op(grad_out, weight.transpose(-1, -2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _weight_grad_op(grad_out, x, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [M, in] sorted by expert (`counts` [E] rows each, summing to M), times
    each expert's weight [E, out, in]^T -> [M, out]. `x` and `weight` share a dtype (fp32 or
    bf16); differentiable in both."""
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    return _grouped_mm_op(x, weight, counts.cumsum(0).to(torch.int32))


def _through_op(x: torch.Tensor) -> bool:
    """Whether a call on `x` goes through the custom operator rather than straight to the
    kernel: when traced, and for meta and fake tensors (a shape pass: torch._grouped_mm's own
    meta kernel refuses fp32, the operator's does not)."""
    return torch.compiler.is_compiling() or x.is_meta or type(x) is not torch.Tensor


def grouped_mm_at(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` given the experts' end rows: `offsets` int32 [E], the cumulative counts
    (computed once by a caller running several GEMMs over one layout). M must be > 0. For
    callers that compute their own gradients (an autograd Function's forward and backward):
    eager, it calls the kernel without the custom operator's dispatch (~0.1 ms a call on CPU)."""
    if _through_op(x):
        return _grouped_mm_op(x, weight, offsets)
    return _grouped_mm_kernel(x, weight, offsets)


def grouped_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grad_out_e^T x_e for each expert e: [M, out] and [M, in] sorted by expert, `offsets` int32
    [E] end rows -> [E, out, in], the weight gradient of `grouped_mm_at` (an empty expert's is 0).
    Eager without the operator's dispatch, as `grouped_mm_at`."""
    if _through_op(x):
        return _weight_grad_op(grad_out, x, offsets)
    return _weight_grad_kernel(grad_out, x, offsets)
