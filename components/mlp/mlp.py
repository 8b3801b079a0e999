"""Two-layer feed-forward network: down(dropout(act(up(x))))."""

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


@FEED_FORWARD.register("mlp")
@invariant("0 <= dropout < 1", lambda dropout: 0 <= dropout < 1, fix="use a probability in [0, 1)")
class MLP(FeedForward, TensorParallel):
    """The classic transformer MLP (GPT-2: gelu_tanh, hidden 4D, biases).

    Args:
        dim: model width D. hidden_dim: inner width F.
        activation: "gelu", "gelu_tanh", "relu" or "silu".
        bias: whether the projections have biases. dropout: on the output (training only).

    forward(x: [B, T, D]) -> [B, T, D].
    """

    tensor_parallel_divides: ClassVar[tuple[str, ...]] = ("hidden_dim",)  # the hidden units split over tp ranks

    def __init__(self, *, dim: int, hidden_dim: int, activation: Activation = "gelu", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.w_up = nn.Linear(dim, hidden_dim, bias=bias)
        self.w_down = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w_down(ACTIVATIONS[self.activation](self.w_up(x))))

    def tensor_parallel_plan(self, *, output_layout: Placement) -> dict[str, ParallelStyle]:
        """Up projection column-wise (F/tp hidden units per tp rank, bias sharded with them),
        down projection row-wise (bias replicated, added once): its partial sums leave as a
        DTensor with `output_layout`. The input comes in replicated."""
        return {"w_up": colwise(), "w_down": rowwise(output_layout)}

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        init_linears(((self.w_up, init_std), (self.w_down, out_std)))
