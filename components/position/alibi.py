"""ALiBi: attention with linear biases (Press et al., 2022)."""

from __future__ import annotations

import math

import torch

from tessera.components.interfaces import AdditiveBias
from tessera.registry.kinds import POSITION


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """[H] head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n = H a power of two.

    For other H, the paper's recipe: the slopes of the nearest lower power of two m, then
    every other slope of 2m until H are filled.
    """
    def geometric(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return torch.tensor(geometric(n_heads))
    m = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(geometric(m) + geometric(2 * m)[0::2][: n_heads - m])


@POSITION.register("alibi")
class ALiBi(AdditiveBias):
    """Score bias -slope_h * (i - j) for query i and key j <= i: distant keys are penalised linearly.

    forward(n_heads, positions: [T]) -> [H, T, T] fp32 (future entries are left to the causal mask).
    """

    def forward(self, n_heads: int, positions: torch.Tensor) -> torch.Tensor:
        distance = (positions[None, :] - positions[:, None]).to(torch.float32)  # j - i, <= 0 for the past
        return alibi_slopes(n_heads).to(positions.device)[:, None, None] * distance

    def pair_bias(self, n_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (k_pos - q_pos).to(torch.float32)
        return alibi_slopes(n_heads).to(distance.device).view(-1, *[1] * distance.dim()) * distance
