"""An example third-party plugin: ScaleNorm (Nguyen & Salazar, 2019) as NORM "scale_norm".

Install with `pip install -e examples/plugin`, then e.g.
`python recipes/llama_pretrain.py model.norm=@scale_norm --print`.
"""

import torch
from torch import nn

from components.interfaces import Norm
from registry import NORM


@NORM.register("scale_norm")
class ScaleNorm(Norm):
    """g * x / ||x|| over the last dimension with one learned scalar g (init sqrt(dim))."""

    def __init__(self, *, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.g.fill_(float(self.dim) ** 0.5)
