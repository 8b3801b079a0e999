"""Absolute position encodings added to token embeddings: learned table and sinusoidal."""

from __future__ import annotations

import math

import torch
from torch import nn

from tessera.components.interfaces import AbsoluteEncoding, NoPosition
from tessera.components.model.init import normal_
from tessera.registry.invariants import invariant
from tessera.registry.kinds import POSITION


@POSITION.register("learned")
@invariant("max_len > 0", lambda max_len: max_len > 0, fix="set max_len to the longest training sequence")
class LearnedPositions(AbsoluteEncoding):
    """A trained [max_len, dim] table (GPT-2). forward(positions: [T] or [B, T], dim) -> [..., dim]."""

    def __init__(self, *, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.dim = dim
        self.table = nn.Embedding(max_len, dim)
        self.reset_parameters()

    def forward(self, positions: torch.Tensor, dim: int) -> torch.Tensor:
        if positions.max() >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the learned table (max_len={self.max_len}): "
                             f"generate fewer tokens or use a model with a larger max_len")
        return self.table(positions)

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        normal_(self.table.weight, init_std)


@POSITION.register("sinusoidal")
class Sinusoidal(AbsoluteEncoding):
    """Fixed encoding (Vaswani et al., 2017): channel 2i = sin(p w_i), 2i+1 = cos(p w_i), w_i = base^(-2i/dim).

    forward(positions: [T] or [B, T], dim) -> [..., dim]; dim must be even.
    """

    def __init__(self, *, base: float = 10000.0):
        super().__init__()
        self.base = base

    def forward(self, positions: torch.Tensor, dim: int) -> torch.Tensor:
        freqs = torch.exp(-math.log(self.base) * torch.arange(0, dim, 2, device=positions.device,
                                                                dtype=torch.float32) / dim)
        angles = positions.to(torch.float32)[..., None] * freqs
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # sin at even, cos at odd


@POSITION.register("nope")
class NoPE(NoPosition):
    """No position signal at all (causal masking alone carries order, Kazemnejad et al., 2023)."""
