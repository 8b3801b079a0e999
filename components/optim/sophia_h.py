"""Sophia-H (Liu et al., 2023): Sophia with the Hutchinson estimate of the Hessian diagonal,
pytorch_optimizer's implementation."""

from __future__ import annotations

import pytorch_optimizer

from registry.kinds import OPTIMIZER


@OPTIMIZER.register("sophia_h")
class SophiaH(pytorch_optimizer.SophiaH):
    """pytorch_optimizer's SophiaH. Every `update_period` steps its step() estimates diag(H)
    as z * (H z) (z Gaussian or Rademacher), differentiating the gradients once more; for that
    the trainer runs the backward of those steps with `create_graph=True` (and attention on
    SDPA's math kernel, whose backward is itself differentiable), as `wants_second_order()`
    asks. Registered as-is: lr, betas, weight_decay, p (the update clip), update_period,
    num_samples, hessian_distribution."""

    def wants_second_order(self) -> bool:
        """Whether the coming step() estimates the Hessian (its gradients must carry a graph)."""
        return self.param_groups[0].get("step", 0) % self.update_period == 0
