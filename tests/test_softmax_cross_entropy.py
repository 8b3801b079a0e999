"""The CPU cross-entropy through softmax against torch's F.cross_entropy: values, gradients,
second derivatives, bf16 logits and targets far out in the tail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.components.model.decoder import cross_entropy
from tessera.components.model.softmax_cross_entropy import softmax_cross_entropy, twice_differentiable


def _loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets)
    loss.backward()
    return loss.detach(), x.grad


def reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), targets)


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_value_and_gradient_match_torch_in_fp32(scale):
    torch.manual_seed(0)
    logits, targets = torch.randn(300, 97) * scale, torch.randint(0, 97, (300,))
    loss, grad = _loss_and_grad(softmax_cross_entropy, logits, targets)
    want_loss, want_grad = _loss_and_grad(reference, logits, targets)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-8)


def test_bf16_logits_give_an_fp32_loss_and_a_bf16_gradient():
    torch.manual_seed(1)
    logits, targets = (torch.randn(64, 50) * 4).bfloat16(), torch.randint(0, 50, (64,))
    loss, grad = _loss_and_grad(softmax_cross_entropy, logits, targets)
    want_loss, want_grad = _loss_and_grad(reference, logits.double(), targets)  # the same bf16 values
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad.bfloat16().double(), rtol=1e-2, atol=1e-5)


def test_a_target_far_in_the_tail_keeps_an_exact_finite_loss():
    # p of the target is exp(-200): below fp32's range, where -log(p) alone would be inf
    logits = torch.zeros(4, 10)
    logits[:, 3] = 200.0
    targets = torch.tensor([0, 3, 5, 3])
    loss, grad = _loss_and_grad(softmax_cross_entropy, logits, targets)
    want_loss, want_grad = _loss_and_grad(reference, logits, targets)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=1e-5, atol=1e-7)


def test_a_second_derivative_is_refused_and_the_twice_differentiable_loss_is_torchs():
    # a Hessian-vector product through the loss, as Sophia-H takes with create_graph=True
    torch.manual_seed(2)
    logits, targets, v = torch.randn(4, 20, 7), torch.randint(0, 7, (4, 20)), torch.randn(4, 20, 7)

    def hvp(fn):
        x = logits.double().clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(x, targets), x, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v.double()).sum(), x)
        return hv

    with pytest.raises(RuntimeError, match="differentiable once"):
        hvp(cross_entropy)  # never a silently wrong second derivative
    with twice_differentiable():
        mine = hvp(cross_entropy)
    torch.testing.assert_close(mine, hvp(lambda x, t: F.cross_entropy(x.flatten(0, 1), t.flatten())))


def test_the_models_loss_uses_it_on_cpu_and_matches_torch():
    torch.manual_seed(3)
    logits, targets = torch.randn(2, 5, 11, requires_grad=True), torch.randint(0, 11, (2, 5))
    loss = cross_entropy(logits, targets)
    assert loss.grad_fn.name().endswith("_SoftmaxCrossEntropyBackward")
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
