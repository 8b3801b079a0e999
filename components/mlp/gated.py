"""Gated linear-unit feed-forward (Shazeer, 2020): down(act(gate(x)) * up(x)); SwiGLU, GeGLU, ReGLU."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tessera.components.interfaces import FeedForward, TensorParallel
from tessera.components.mlp.activations import ACTIVATIONS, Activation
from tessera.components.model.init import init_linears
from tessera.components.parallel.tp_styles import ParallelStyle, Placement, colwise, rowwise
from tessera.registry.invariants import invariant
from tessera.registry.kinds import FEED_FORWARD


@FEED_FORWARD.register("gated_mlp")
@invariant("0 <= dropout < 1", lambda dropout: 0 <= dropout < 1, fix="use a probability in [0, 1)")
class GatedMLP(FeedForward, TensorParallel):
    """Gated MLP with any activation on the gate branch.

    Args:
        dim: model width D. hidden_dim: inner width F (Llama: about 8/3 D, rounded).
        activation: the gate activation ("silu" is SwiGLU, "gelu" GeGLU, "relu" ReGLU).
        bias: whether the projections have biases. dropout: on the output (training only).

    forward(x: [B, T, D]) -> [B, T, D].
    """

    tensor_parallel_divides: ClassVar[tuple[str, ...]] = ("hidden_dim",)  # the hidden units split over tp ranks

    def __init__(self, *, dim: int, hidden_dim: int, activation: Activation = "silu", bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.w_gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.w_up = nn.Linear(dim, hidden_dim, bias=bias)
        self.w_down = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w_down(ACTIVATIONS[self.activation](self.w_gate(x)) * self.w_up(x)))

    def tensor_parallel_plan(self, *, output_layout: Placement) -> dict[str, ParallelStyle]:
        """Gate and up projections column-wise (F/tp hidden units per tp rank, the gating is
        elementwise so it stays local), the down projection row-wise: its partial sums leave as
        a DTensor with `output_layout`. The input comes in replicated."""
        return {"w_gate": colwise(), "w_up": colwise(), "w_down": rowwise(output_layout)}

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        init_linears(((self.w_gate, init_std), (self.w_up, init_std), (self.w_down, out_std)))


@FEED_FORWARD.register("swiglu")
class SwiGLU(GatedMLP):
    """GatedMLP with a SiLU gate (Llama, DeepSeek)."""

    def __init__(self, *, dim: int, hidden_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__(dim=dim, hidden_dim=hidden_dim, activation="silu", bias=bias, dropout=dropout)


@FEED_FORWARD.register("geglu")
class GeGLU(GatedMLP):
    """GatedMLP with an exact-GELU gate."""

    def __init__(self, *, dim: int, hidden_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__(dim=dim, hidden_dim=hidden_dim, activation="gelu", bias=bias, dropout=dropout)


@FEED_FORWARD.register("reglu")
class ReGLU(GatedMLP):
    """GatedMLP with a ReLU gate."""

    def __init__(self, *, dim: int, hidden_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__(dim=dim, hidden_dim=hidden_dim, activation="relu", bias=bias, dropout=dropout)
