"""SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.interfaces import FeedForward
from registry.kinds import FEED_FORWARD


@FEED_FORWARD.register("swiglu")
class SwiGLU(FeedForward):
    """Gated MLP with a SiLU gate.

    Args:
        dim: model width D.
        hidden_dim: inner width F (Llama uses about 8/3 D rounded up).
        bias: whether the projections have biases.

    forward(x: [B, T, D]) -> [B, T, D].
    """

    def __init__(self, *, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.w_gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.w_up = nn.Linear(dim, hidden_dim, bias=bias)
        self.w_down = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def reset_parameters(self, *, init_std: float, out_std: float) -> None:
        for linear, std in ((self.w_gate, init_std), (self.w_up, init_std), (self.w_down, out_std)):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
