"""Sophia-H (Liu et al., 2023): Sophia with the Hutchinson estimate of the Hessian diagonal,
pytorch_optimizer's implementation."""

from __future__ import annotations

import pytorch_optimizer
import torch

from tessera.components.interfaces import SecondOrderOptimizer
from tessera.registry.kinds import OPTIMIZER


@OPTIMIZER.register("sophia_h")
class SophiaH(pytorch_optimizer.SophiaH, SecondOrderOptimizer):
    """pytorch_optimizer's SophiaH. Every `update_period` steps its step() estimates diag(H)
    as z * (H z) (z Gaussian or Rademacher), differentiating the gradients once more; for that
    the trainer runs the backward of those steps with `create_graph=True` (and attention on
    SDPA's math kernel, whose backward is itself differentiable), as `wants_second_order()`
    asks. Registered as-is: lr, betas, weight_decay, p (the update clip), update_period,
    num_samples, hessian_distribution."""

    def wants_second_order(self) -> bool:
        """Whether the coming step() estimates the Hessian (its gradients must carry a graph)."""
        return self.param_groups[0].get("step", 0) % self.update_period == 0

    @torch.no_grad()
    def step(self, closure=None, hessian=None):  # noqa: ANN001 - the library's signature
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if hessian is None and self.wants_second_order() and not any(g.requires_grad for g in grads):
            if any(g.any() for g in grads):
                raise RuntimeError("sophia_h: this step estimates the Hessian, but the gradients carry no graph; "
                                   "run its backward with create_graph=True (the trainer does when "
                                   "wants_second_order() is True)")
            # All-zero gradients without a graph: a state-initialising step (torch's checkpoint
            # loading takes one); their Hessian-vector products are zero.
            hessian = [torch.zeros_like(p) for g in self.param_groups for p in g["params"]]
        return super().step(closure, hessian)
