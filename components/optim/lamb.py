"""LAMB (You et al., 2020, Algorithm 2): Adam directions rescaled per layer by a trust ratio."""

from __future__ import annotations

import torch

from tessera.components.interfaces import ParamGroups
from tessera.registry.kinds import OPTIMIZER


@OPTIMIZER.register("lamb")
class Lamb(torch.optim.Optimizer):
    """For each parameter tensor w with gradient g, at step t:

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        w = w - lr * (||w|| / ||r||) * r        (trust ratio 1 when either norm is 0)

    Written here because the library implementations we checked add switches whose defaults
    depart from the paper's update (grad averaging, decoupled decay, rectification).
    """

    def __init__(self, params: ParamGroups, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = (w_norm / u_norm) if w_norm > 0 and u_norm > 0 else torch.ones(())
                p.add_(update, alpha=-group["lr"] * trust.item())
        return loss
