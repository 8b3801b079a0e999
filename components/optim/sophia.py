"""Sophia-G (Liu et al., 2023, Algorithm 3): clipped, Hessian-preconditioned momentum with the
Gauss-Newton-Bartlett (GNB) diagonal Hessian estimate."""

from __future__ import annotations

import torch

from tessera.components.interfaces import HessianEstimateOptimizer, ParamGroups
from tessera.registry.kinds import OPTIMIZER


@OPTIMIZER.register("sophia")
class SophiaG(torch.optim.Optimizer, HessianEstimateOptimizer):
    """Per step, for parameter θ with gradient g:

        m = b1 m + (1 - b1) g
        θ = θ - lr * weight_decay * θ
        θ = θ - lr * clip(m / max(rho * h, eps), -1, 1)

    Every `hessian_interval` steps the trainer calls `update_hessian(batch_size)` after a
    backward pass of the loss on labels *sampled from the model's own softmax*; the GNB
    estimate is then ĥ = batch_size * ĝ ⊙ ĝ and h = b2 h + (1 - b2) ĥ. (The Hutchinson variant
    is `pytorch_optimizer.SophiaH` for users who want it.)
    """

    def __init__(self, params: ParamGroups, *, lr: float = 2e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15, hessian_interval: int = 10):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))
        self.hessian_interval = hessian_interval

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self, batch_size: int) -> None:
        """Fold the current gradients (of the sampled-label loss) into the Hessian estimate."""
        for group in self.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    self._state(p)["hessian"].mul_(b2).addcmul_(p.grad, p.grad, value=(1 - b2) * batch_size)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                m = state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                ratio = (m / (group["rho"] * state["hessian"]).clamp(min=group["eps"])).clamp(-1, 1)
                p.add_(ratio, alpha=-group["lr"])
        return loss
