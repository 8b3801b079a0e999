"""AdamW (Loshchilov & Hutter, 2019), torch's own implementation, fused where torch has a fused kernel."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from tessera.components.interfaces import ParamGroups
from tessera.registry.kinds import OPTIMIZER

_FUSED_DEVICES = {"cpu", "cuda", "xpu", "mps"}  # devices with torch's fused AdamW kernel


@OPTIMIZER.register("adamw")
def adamw(params: ParamGroups, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, fused: bool | None = None) -> torch.optim.Optimizer:
    """torch.optim.AdamW over `params`. `fused=None` picks torch's fused kernel (one pass over
    each parameter for the whole update) when every parameter is a floating tensor on a device
    that has it (on this 2-core CPU 7x faster than the default loop: 15 ms vs 108 ms for 30M
    parameters) and they are all DTensors or all plain tensors, and the default implementation
    otherwise; True/False force the choice."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):  # plain tensors: one group
        groups = [{"params": groups}]
    groups = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
              for g in groups]
    if fused is None:
        tensors = [p for g in groups for p in g["params"]]
        # the fused kernel takes DTensors (FSDP, TP) or plain tensors, not both at once (expert-
        # parallel experts beside DDP's replicated weights): the loop then
        fused = bool(tensors) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in tensors) \
            and len({isinstance(p, DTensor) for p in tensors}) == 1
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
