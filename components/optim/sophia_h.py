"""Sophia-H (Liu et al., 2023, arXiv:2305.14342): Sophia with the Hutchinson estimate of the
Hessian diagonal, pytorch_optimizer's implementation, imported on first use."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Literal

import torch

from tessera.components.interfaces import SecondOrderOptimizer
from tessera.registry.kinds import OPTIMIZER


@OPTIMIZER.register("sophia_h")
class SophiaH(torch.optim.Optimizer, SecondOrderOptimizer):
    """pytorch_optimizer's SophiaH. Every `update_period` steps its step() estimates diag(H)
    as z * (H z) (z Gaussian or Rademacher), differentiating the gradients once more; for that
    the trainer runs the backward of those steps with `create_graph=True` (and attention on
    SDPA's math kernel), as `wants_second_order()` asks. Options as pytorch_optimizer names
    them: lr, betas, weight_decay (decoupled unless `weight_decouple=False`), p (the update
    clip), update_period, num_samples, hessian_distribution, eps.

    Constructing one returns pytorch_optimizer's class with this project's two methods
    (`_implementation`): pytorch_optimizer imports transformers, ~1 s that every process
    would pay at start-up if it were imported with the registry."""

    def __new__(cls, params: Any, **options: Any) -> torch.optim.Optimizer:
        return _implementation()(params, **options)

    @classmethod
    def state_tensors(cls, groups: Any, **_: Any) -> dict[int, float]:
        """{id(parameter): 3.0} (`tessera.components.optim.state_size`): the implementation keeps
        a momentum, the latest Hessian estimate and its moving average, each the parameter's size."""
        return {id(p): 3.0 for group in groups for p in group["params"]}

    def __init__(self, params: Any, *, lr: float = 0.06, betas: tuple[float, float] = (0.96, 0.99),
                 weight_decay: float = 0.0, weight_decouple: bool = True, p: float = 0.01, update_period: int = 10,
                 num_samples: int = 1, hessian_distribution: Literal["gaussian", "rademacher"] = "gaussian",
                 eps: float = 1e-12) -> None:  # the registry's signature; `__new__` builds the real one
        raise AssertionError("unreachable: SophiaH() returns the implementation's instance")


# What configs, validation and the catalogue read (inspect would otherwise show `__new__`'s **options)
_INIT = inspect.signature(SophiaH.__init__)
SophiaH.__signature__ = _INIT.replace(parameters=list(_INIT.parameters.values())[1:])  # type: ignore[attr-defined]


class _SecondOrderSteps(SecondOrderOptimizer):
    """What Sophia-H adds to pytorch_optimizer's class: when to differentiate twice, and a
    state-initialising step without a graph."""

    update_period: int
    param_groups: list[dict[str, Any]]

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


@functools.cache
def _implementation() -> type[torch.optim.Optimizer]:
    """pytorch_optimizer's SophiaH with `_SecondOrderSteps` in front (built once)."""
    import pytorch_optimizer

    return type("SophiaH", (_SecondOrderSteps, pytorch_optimizer.SophiaH), {"__module__": __name__})
