"""Next-token cross-entropy on CPU through softmax, not log_softmax.

On CPU torch's fp32 `log_softmax` kernel runs ~4x slower than its `softmax` (measured at
[2048, 2048], one thread, AVX512: 10.0 ms against 2.5 ms), and F.cross_entropy calls it in the
forward and differentiates it in the backward; at the debug model's 2048-token vocabulary the two
heads' losses (LM and MTP) took more than a third of a bf16 training step. Here:

    p = softmax(x) in fp32                   one pass, from bf16 or fp32 logits, no fp32 copy first
    loss_n = -log p[n, t_n]                   exact to fp32 rounding while p[n, t_n] is a normal float
    d loss / d x = (p - onehot(t)) * g / N    from the saved p: no second exponentiation

A target whose probability falls below fp32's normal range (a logit gap beyond ~87 nats, where
-log p would lose digits or overflow) has its loss taken as logsumexp(x_n) - x[n, t_n] instead,
row by row, so the value stays exact however confident the model is. A backward that builds its
own graph (create_graph=True: Sophia-H's Hessian-vector products) recomputes p from the logits
with differentiable ops, so second derivatives are the true ones. Memory: p in fp32 [N, V] as
log_softmax's output would be, plus a reference to the logits.
"""

from __future__ import annotations

import torch

# below this, -log(p) loses precision to subnormal rounding (fp32's smallest normal is ~1.2e-38)
_SMALLEST_SAFE = 1e-30


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """See `softmax_cross_entropy`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, V]
        picked = probs.gather(1, targets[:, None]).squeeze(1)  # [N]
        losses = -picked.log()
        tiny = picked < _SMALLEST_SAFE
        if tiny.any():  # rare: recompute those rows' losses from the logits themselves
            rows = logits[tiny].float()
            losses[tiny] = torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[tiny][:, None]).squeeze(1)
        ctx.save_for_backward(probs, targets, logits)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, targets, logits = ctx.saved_tensors
        n = probs.shape[0]
        if torch.is_grad_enabled():  # create_graph: the gradient itself must be differentiable in the logits
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        grad_logits = probs * (grad / n)  # a new tensor: the saved p stays intact for a second backward
        grad_logits.index_put_((torch.arange(n), targets), (-grad / n).expand(n), accumulate=True)
        return grad_logits.to(logits.dtype), None


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (fp32 or bf16; computed in fp32) against class
    indices [N] in [0, V): F.cross_entropy's value and gradient (to fp32 rounding), faster on
    CPU. No ignore_index: every target must be a class."""
    return _SoftmaxCrossEntropy.apply(logits, targets)
