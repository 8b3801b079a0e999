"""Building modules on the meta device without drawing their initial weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

NORMAL_DRAWS = frozenset({nn.init.normal_, nn.init.xavier_normal_, nn.init.kaiming_normal_, torch.Tensor.normal_})
"""In-place normal draws. On a meta tensor torch runs them through its Python reference
(torch._refs.normal), whose wrapper imports torch._dynamo: 0.4-0.5 s that a process which never
compiles would pay for drawing numbers a meta tensor cannot hold."""


class _SkipDrawsOnMeta(TorchFunctionMode):
    """Returns a meta tensor unchanged from a `NORMAL_DRAWS` call; every other call runs as usual."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in NORMAL_DRAWS:
            # nn.init passes its tensor by keyword, Tensor.normal_ as `self`
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside are on the meta device (shapes and dtypes only, no memory) and
    skip their normal draws; a meta parameter gets its values later (`to_empty` then
    `reset_parameters`), never from its constructor."""
    with torch.device("meta"), _SkipDrawsOnMeta():
        yield
