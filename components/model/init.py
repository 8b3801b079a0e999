"""Weight initialisation shared by the blocks."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def init_linears(pairs: Iterable[tuple[nn.Linear, float]]) -> None:
    """Normal(0, std) weights and zero biases for each (linear, std) pair."""
    for linear, std in pairs:
        nn.init.normal_(linear.weight, std=std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
