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
    The outer state (`theta_old`, momentum) is saved with the checkpoint (`state_dict`), so a
    resumed run continues exactly, whichever step it was saved at.

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

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: the anchor `theta_old` (one tensor per trained
        parameter), the outer momentum buffers (once the first outer step made them), the
        sync and byte counters."""
        state: dict[str, Any] = {"syncs": self.syncs, "bytes_sent": self.bytes_sent}
        if self.outer_params is not None and self.outer_optimizer is not None:
            state["anchor"] = list(self.outer_params)
            momentum = [self.outer_optimizer.state.get(p, {}).get("momentum_buffer") for p in self.outer_params]
            if all(m is not None for m in momentum):
                state["momentum"] = momentum
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, after `begin` (which made the outer optimizer)."""
        if not state:
            return
        self.syncs, self.bytes_sent = state["syncs"], state["bytes_sent"]
        if "anchor" not in state or self.outer_params is None or self.outer_optimizer is None:
            return
        with torch.no_grad():
            for old, saved in zip(self.outer_params, state["anchor"], strict=True):
                old.copy_(saved)
        for old, saved in zip(self.outer_params, state["momentum"] if "momentum" in state else [], strict=False):
            self.outer_optimizer.state[old]["momentum_buffer"] = saved.clone()

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


def replica_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """One replica's own weights and inner optimizer state, which differ between replicas
    (the weights between syncs; the inner optimizer's moments always, since each replica
    steps on its own gradients): a checkpoint's model and optimizer entries hold one
    replica's only. Optimizer state is keyed by the parameter's position in its groups."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {"weights": [p.detach() for p in _trained(model)],
            "optimizer": {str(i): dict(optimizer.state[p]) for i, p in enumerate(params) if p in optimizer.state}}


def load_replica_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what `replica_state` returned, after the checkpoint's model and optimizer."""
    with torch.no_grad():
        for param, saved in zip(_trained(model), state["weights"], strict=True):
            param.copy_(saved)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["optimizer"].items():
        optimizer.state[params[int(index)]] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                               for k, v in entries.items()}


def _trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
