"""YaRN context extension of RoPE (Peng et al., 2023), as configured by DeepSeek-V2/V3."""

from __future__ import annotations

import math

import torch

from tessera.components.position.rope import RoPE
from tessera.registry.invariants import invariant
from tessera.registry.kinds import POSITION


def yarn_mscale(factor: float, mscale: float) -> float:
    """Attention temperature term sqrt(t) = 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


@POSITION.register("yarn")
@invariant("factor >= 1", lambda factor: factor >= 1, fix="use factor >= 1 (1 means no extension)")
@invariant("beta_fast > beta_slow > 0", lambda beta_fast, beta_slow: beta_fast > beta_slow > 0,
           fix="use e.g. beta_fast=32, beta_slow=1")
class YaRN(RoPE):
    """RoPE whose low-frequency channels are interpolated by `factor`, high-frequency ones kept.

    Channel pair i (frequency theta^(-2i/Dh)) completes `original_max_len * f_i / 2pi`
    rotations over the original context. Pairs completing more than `beta_fast` rotations keep
    their frequency, fewer than `beta_slow` are divided by `factor`, and a linear ramp over
    the pair index blends the two in between. The softmax scale is multiplied by
    yarn_mscale(factor, mscale_all_dim)^2 and cos/sin by
    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) (1.0 for DeepSeek,
    where the two are equal). DeepSeek-V2/V3: factor 40, original 4096, beta 32/1,
    mscale = mscale_all_dim = 0.707 (V2) or 1.0 (V3).

    The multiplier is applied whenever YaRN is configured (as Hugging Face does for the
    released long-context checkpoints); pretrain at the original length with plain `rope`.
    """

    def __init__(self, *, theta: float = 10000.0, interleaved: bool = False, factor: float = 40.0,
                 original_max_len: int = 4096, beta_fast: float = 32.0, beta_slow: float = 1.0,
                 mscale: float = 1.0, mscale_all_dim: float = 1.0):
        super().__init__(theta=theta, interleaved=interleaved)
        self.factor = factor
        self.original_max_len = original_max_len
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.mscale = mscale
        self.mscale_all_dim = mscale_all_dim

    def _pair_index_for_rotations(self, rotations: float, head_dim: int) -> float:
        # Solve original_max_len * theta^(-2i/Dh) / (2 pi) = rotations for the pair index i.
        return head_dim * math.log(self.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

    def inv_freq(self, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
        base = super().inv_freq(head_dim, device)
        low = max(math.floor(self._pair_index_for_rotations(self.beta_fast, head_dim)), 0)
        high = min(math.ceil(self._pair_index_for_rotations(self.beta_slow, head_dim)), head_dim - 1)
        span = (high - low) if high != low else 0.001
        ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / span).clamp(0, 1)
        return base / self.factor * ramp + base * (1 - ramp)

    def amplitude(self) -> float:
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

    def softmax_scale_multiplier(self) -> float:
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2
