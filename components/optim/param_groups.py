"""Splits a model's parameters into weight-decay and no-decay groups."""

from __future__ import annotations

from typing import Any

from torch import nn


def decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two torch parameter groups: matrices decay; vectors (norm weights, biases) do not.

    Returns [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]: the first group
    takes the optimizer's configured weight decay, the second none.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
