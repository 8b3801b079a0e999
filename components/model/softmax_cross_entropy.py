"""Next-token cross-entropy on CPU through softmax, not log_softmax.

On CPU torch's `log_softmax` backward is slow: F.cross_entropy's forward and backward of a
[2048, 2048] fp32 loss took 17 ms on one thread (AVX512), and at the debug model's
2048-token vocabulary the two heads' losses (LM and MTP) took more than a third of a bf16
training step. Here:

    p = softmax(x) in fp32                   one pass, from bf16 or fp32 logits, no fp32 copy first
    loss_n = -log p[n, t_n]                   exact to fp32 rounding while p[n, t_n] is a normal float
    d loss / d x = (p - onehot(t)) * g / N    from the saved p: no second exponentiation

(6.5 ms for the same loss). A target whose probability falls below fp32's normal range (a logit
gap beyond ~87 nats, where -log p would lose digits or overflow) has its loss taken as
logsumexp(x_n) - x[n, t_n] instead, row by row, so the value stays exact however confident the
model is. It saves what F.cross_entropy saves (p where that saves log p, fp32 [N, V], and the
targets). Its gradient is not differentiable again: a backward with create_graph=True
(Sophia-H's Hessian-vector products) raises, and the trainer computes such steps' losses under
`twice_differentiable()`, where `cross_entropy` of the model takes F.cross_entropy.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

# below this, -log(p) loses precision to subnormal rounding (fp32's smallest normal is ~1.2e-38)
_SMALLEST_SAFE = 1e-30
_TWICE = contextvars.ContextVar("tessera_twice_differentiable_loss", default=False)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """See `softmax_cross_entropy`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, V]
        picked = probs.gather(1, targets[:, None]).squeeze(1)  # [N]
        losses = -picked.log()
        tiny = picked < _SMALLEST_SAFE
        # meta: the planner's measuring pass, where no value exists and no row can be tiny
        if not probs.is_meta and tiny.any():  # rare: recompute those rows' losses from the logits
            rows = logits[tiny].float()
            losses[tiny] = torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[tiny][:, None]).squeeze(1)
        ctx.save_for_backward(probs, targets)
        ctx.logits_dtype = logits.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the gradient below has no graph of its own
            raise RuntimeError("tessera's CPU cross-entropy is differentiable once; take second derivatives "
                               "(create_graph=True) within tessera.components.model.softmax_cross_entropy."
                               "twice_differentiable(), where the model's loss is F.cross_entropy")
        probs, targets = ctx.saved_tensors
        n = probs.shape[0]
        grad_logits = probs * (grad / n)  # a new tensor: the saved p stays intact for a second backward
        grad_logits[torch.arange(n, device=probs.device), targets] -= grad / n
        return grad_logits.to(ctx.logits_dtype), None


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (fp32 or bf16; computed in fp32) against class
    indices [N] in [0, V): F.cross_entropy's value and gradient (to fp32 rounding), faster on
    CPU. No ignore_index: every target must be a class. Differentiable once."""
    return _SoftmaxCrossEntropy.apply(logits, targets)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Within this, `wanted()` is False: losses take F.cross_entropy, whose gradient has a graph."""
    token = _TWICE.set(True)
    try:
        yield
    finally:
        _TWICE.reset(token)


def wanted(logits: torch.Tensor) -> bool:
    """Whether `logits` should take `softmax_cross_entropy`: plain CPU tensors in eager mode
    (under compile inductor fuses F.cross_entropy itself; on GPUs its kernel is fast) and the
    planner's meta pass (which measures what the CPU run saves), outside `twice_differentiable`."""
    return (logits.device.type in ("cpu", "meta") and not torch.compiler.is_compiling()
            and not _TWICE.get())
