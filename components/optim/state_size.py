"""How much state an optimizer keeps per parameter, for the memory planner (`--dry-run`,
`step.micro_batch_size="auto"`), known before the optimizer or the weights exist.

State is counted in tensors the size of the parameter: AdamW, LAMB and Sophia keep two (first
and second moments), Muon one (its momentum), Adafactor a row and a column factor per matrix
(Shazeer & Stern, arXiv:1804.04235 §3) and a full second moment per vector. Scalars (step
counters) are left out. An optimizer says what it keeps by a `state_tensors(groups, **settings)`
attribute (a function or classmethod taking the parameter groups and the optimizer's own
keyword settings, returning {id(parameter): tensors}); one that does not is counted as AdamW.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from tessera.components.optim.param_groups import decay_groups

ADAMW_STATE_TENSORS = 2.0
"""What an optimizer that does not say is assumed to keep: AdamW's two moments."""


def state_tensors(optimizer: Any, model: nn.Module) -> dict[int, float]:
    """{id(parameter): state tensors of its size} that `optimizer` (a factory as the trainer
    calls it: a class, a function, or a functools.partial of either) keeps for each trainable
    parameter of `model` once it has stepped, given the trainer's parameter groups
    (`decay_groups`, whose decay switches change no state)."""
    groups = decay_groups(model)
    target, settings = _unwrap(optimizer)
    count = getattr(target, "state_tensors", None)
    if count is not None:
        return count(groups, **settings)
    if target is torch.optim.Adafactor:
        return {id(p): _adafactor(p) for g in groups for p in g["params"]}
    return {id(p): ADAMW_STATE_TENSORS for g in groups for p in g["params"]}


def _unwrap(optimizer: Any) -> tuple[Any, dict[str, Any]]:
    """The class or function a factory calls, and the keyword settings bound to it."""
    settings: dict[str, Any] = {}
    while isinstance(optimizer, functools.partial):
        settings = {**optimizer.keywords, **settings}
        optimizer = optimizer.func
    return optimizer, settings


def _adafactor(param: torch.Tensor) -> float:
    """torch.optim.Adafactor's state for `param`, in tensors of its size: for a matrix (or a
    stack of them) one value per row and one per column of each matrix, else one per element."""
    if param.dim() < 2:
        return 1.0
    rows, cols = param.shape[-2], param.shape[-1]
    return (rows + cols) / (rows * cols)
