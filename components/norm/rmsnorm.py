"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.interfaces import Norm
from tessera.components.norm.compiled import compiled as compiled_kernel
from tessera.registry.kinds import NORM


@NORM.register("rmsnorm")
class RMSNorm(Norm):
    """Root-mean-square norm over the last dimension, no mean subtraction, no bias.

    forward(x: [..., dim]) -> [..., dim] in x's dtype. The statistic is computed in fp32
    (under bf16 autocast too) because a bf16 mean of squares loses precision at large dim.
    `compiled=True` runs a torch.compile'd kernel (measured 3-5x faster on CPU; see
    `tessera.components.norm.compiled`).
    """

    def __init__(self, *, dim: int, eps: float = 1e-6, compiled: bool = False):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.compiled = compiled
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return compiled_kernel("rms_norm")(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype)
        return normed * self.weight.to(x.dtype)

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        nn.init.ones_(self.weight)
