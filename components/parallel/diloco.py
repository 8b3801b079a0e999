"""DiLoCo and local SGD: data parallelism that communicates every H steps instead of every step."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging import utils as model_averaging

from tessera.components.interfaces import PeriodicSync
from tessera.registry.kinds import PERIODIC_SYNC


@PERIODIC_SYNC.register("diloco")
class DiLoCo(PeriodicSync):
    """DiLoCo (Douillard et al., arXiv:2311.08105, Algorithm 1): every replica runs its own
    (inner) optimizer on its own data for `inner_steps` steps without communicating; then the
    replicas average their weights (one all-reduce, torch's `model_averaging.average_parameters`)
    and take one outer step: the outer gradient is the change the average made,
    `theta_old - mean(theta_new)`, applied to `theta_old` (the weights at the previous sync)
    by SGD with Nesterov momentum; every replica continues from the result.

    With `outer_lr=1, outer_momentum=0` the outer step lands exactly on the average: plain
    local SGD (periodic model averaging, Lin et al., arXiv:1808.07217), also registered as
    `local_sgd`. The paper's setting is `outer_lr=0.7, outer_momentum=0.9` with H = 500
    inner steps; a short run needs a smaller H to sync more than a few times.

    Every replica must start from the same weights (`begin` is called before the first step).
    Buffers are not synchronised (the models here have only fixed ones, e.g. rotary tables).
    The outer state (`theta_old`, momentum) lives in memory only: a resumed run restarts
    it from the resumed weights, so checkpoint on sync steps (multiples of `inner_steps`).

    Args:
        inner_steps: H, optimizer steps between synchronisations.
        outer_lr: the outer SGD learning rate.
        outer_momentum: the outer SGD momentum (0: none).
        nesterov: Nesterov momentum (needs `outer_momentum > 0`).
    """

    def __init__(self, *, inner_steps: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True) -> None:
        if inner_steps < 1:
            raise ValueError(f"diloco.inner_steps must be at least 1, got {inner_steps}")
        if outer_lr <= 0:
            raise ValueError(f"diloco.outer_lr must be positive, got {outer_lr}")
        if nesterov and outer_momentum <= 0:
            raise ValueError("diloco.nesterov=True needs diloco.outer_momentum > 0; "
                             "set diloco.nesterov=False for plain outer SGD")
        self.inner_steps = inner_steps
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.nesterov = nesterov
        self.bytes_sent = 0
        self.syncs = 0
        self.outer_params: list[torch.Tensor] | None = None  # theta_old, one per model parameter
        self.outer_optimizer: torch.optim.Optimizer | None = None

    @property
    def plain_average(self) -> bool:
        """True for local SGD: the outer step is the average itself, no outer state needed."""
        return self.outer_lr == 1.0 and self.outer_momentum == 0.0

    def begin(self, model: nn.Module, process_group: Any) -> None:
        if self.plain_average:
            return
        self.outer_params = [p.detach().clone() for p in _trained(model)]
        self.outer_optimizer = torch.optim.SGD(self.outer_params, lr=self.outer_lr,
                                               momentum=self.outer_momentum, nesterov=self.nesterov)

    def after_step(self, model: nn.Module, step: int, process_group: Any) -> None:
        if step % self.inner_steps != 0:
            return
        params = _trained(model)
        if not self.plain_average and self.outer_params is None:
            raise RuntimeError("DiLoCo.after_step ran before DiLoCo.begin(model, process_group): the parallel "
                               "plan must call begin with the starting weights before the first step")
        size = dist.get_world_size(process_group) if dist.is_initialized() else 1
        if size > 1:
            self.bytes_sent += sum(p.numel() * p.element_size() for p in params)
            with torch.no_grad():
                model_averaging.average_parameters(iter(params), process_group)
        self.syncs += 1
        if self.plain_average:
            return
        assert self.outer_params is not None and self.outer_optimizer is not None
        with torch.no_grad():
            for old, new in zip(self.outer_params, params, strict=True):
                old.grad = old - new  # the outer gradient: theta_old - mean(theta_new)
            self.outer_optimizer.step()
            for old, new in zip(self.outer_params, params, strict=True):
                new.copy_(old)


@PERIODIC_SYNC.register("local_sgd")
def local_sgd(*, inner_steps: int = 50) -> DiLoCo:
    """Local SGD: every replica steps alone for `inner_steps` steps, then all replicas continue
    from the average of their weights (DiLoCo with outer SGD lr 1 and no momentum)."""
    return DiLoCo(inner_steps=inner_steps, outer_lr=1.0, outer_momentum=0.0, nesterov=False)


def _trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
