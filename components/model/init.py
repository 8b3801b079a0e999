"""Weight initialisation shared by the blocks.

Every block initialises its own parameters in its constructor, as torch modules do, so it is
usable as soon as it is built (on the meta device the init calls cost nothing and draw no
random numbers). Each block's `reset_parameters(*, init_std=None, out_std=None)` draws them
again: input projections from Normal(0, init_std), output projections (those writing into
the residual stream) from Normal(0, out_std). A std left as None means `fan_in_std` of the
weight being drawn, the scale of torch's own default init; a model's init pass (e.g.
`DecoderLM.init_weights`) passes its own stds, such as GPT-2's 0.02 with a depth-scaled output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def fan_in_std(weight: torch.Tensor) -> float:
    """1 / sqrt(fan_in), fan_in the weight's last dimension (the input width of an nn.Linear
    weight [out, in], of stacked expert weights [E, out, in], of a router's [E, in]): LeCun's
    normal init, which keeps a projection's outputs at the scale of its inputs, whatever the width."""
    return weight.shape[-1] ** -0.5


def normal_(weight: torch.Tensor, std: float | None) -> None:
    """Draw `weight` in place from Normal(0, std); None: Normal(0, fan_in_std(weight))."""
    nn.init.normal_(weight, std=fan_in_std(weight) if std is None else std)


def init_linears(pairs: Iterable[tuple[nn.Linear, float | None]]) -> None:
    """Normal(0, std) weights (None: `fan_in_std`) and zero biases for each (linear, std) pair."""
    for linear, std in pairs:
        normal_(linear.weight, std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
