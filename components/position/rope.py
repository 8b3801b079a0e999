"""Rotary position embedding (RoPE, Su et al., 2021) in half-split or interleaved layout."""

from __future__ import annotations

import torch

from tessera.components.interfaces import RotaryEncoding
from tessera.registry.kinds import POSITION


@POSITION.register("rope")
class RoPE(RotaryEncoding):
    """Rotates channel pairs of q/k by position-dependent angles pos * theta^(-2i/Dh).

    Layouts: half-split pairs channel i with i + Dh/2 (Llama / HF `rotate_half`);
    interleaved pairs channel 2i with 2i+1 (the original paper; DeepSeek checkpoints).

    forward(x: [B, H, T, Dh], positions: [T] or [B, T]) -> [B, H, T, Dh], x's dtype.
    Angles are computed in fp32 at call time from Dh, so one object serves any head width.
    """

    def __init__(self, *, theta: float = 10000.0, interleaved: bool = False):
        super().__init__()
        self.theta = theta
        self.interleaved = interleaved

    def inv_freq(self, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
        """[Dh/2] fp32 angular frequencies theta^(-2i/Dh)."""
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        # Computed in Python, so that under torch.compile the frequencies are a constant of the
        # graph: traced as tensor ops, inductor fused the pow into the per-element rotation and
        # recomputed it for every element of q and k (measured: 2.6 ms against 0.5 ms for a
        # [16, 4, 128, 16] bf16 forward+backward on one CPU thread).
        return torch.tensor([self.theta ** (-i / head_dim) for i in range(0, head_dim, 2)], dtype=torch.float32,
                            device=device)

    def amplitude(self) -> float:
        """Multiplier on cos/sin (1 for plain RoPE; context-extension schemes may change it)."""
        return 1.0

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        head_dim = x.shape[-1]
        angles = positions.to(torch.float32)[..., None] * self.inv_freq(head_dim, x.device)  # [(B,) T, Dh/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # [B, 1, T, Dh/2] broadcasts over heads
        amplitude = self.amplitude()
        cos, sin = angles.cos() * amplitude, angles.sin() * amplitude
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            x1, x2 = xf[..., : head_dim // 2], xf[..., head_dim // 2:]
            out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.to(x.dtype)
