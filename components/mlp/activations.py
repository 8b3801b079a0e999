"""Activation functions the feed-forward blocks select by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,                                            # exact erf form
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),      # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}
