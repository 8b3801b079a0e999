"""Values beside the meta device: a meta tensor computed from nothing but constants (positions
from `arange`, a block layout, a mask) gets a real CPU copy, so a component that reads such a
value (`int(layout.sum(-1).max())`, `if positions.max() >= max_len`) runs on meta as it runs
on a device.

Why: the dry run measures activations by running the model on the meta device, where tensors
have shapes but no values. Components read values that depend only on the sequence length
and their own settings; those are cheap to compute for real. Values that depend on the
weights or the batch stay unknown, and reading one raises `UnknownValue` naming the module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from tessera.components.interfaces import DryRunError

MAX_ELEMENTS = 1 << 22
"""The largest tensor given a real copy (16 MiB of fp32): layouts, positions and position
tables fit; a model-sized intermediate gets none, and neither does what is computed from it."""

_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
"""The ops that hand a tensor's value to Python (`.item()`, `int()`, `bool()`)."""

_aten = torch.ops.aten
_UNINITIALISED = (_aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default,
                  _aten.new_empty.default, _aten.new_empty_strided.default)
"""Factories whose values are whatever memory held: never known."""


class UnknownValue(DryRunError):
    """A component read the value of a meta tensor that depends on the weights or the batch."""


class KnownValues(TorchDispatchMode):
    """While active, every op whose meta inputs all have real copies (or that makes a meta
    tensor from constants) also runs on those copies on the CPU; reading the value of a meta
    tensor answers from its copy. An op that writes into a tensor from an unknown one drops
    the copy (of the tensor and of its base). `where()` names the running module in faults."""

    def __init__(self, *, where: Any = lambda: "the model") -> None:
        super().__init__()
        self.copies = WeakTensorKeyDictionary()
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        metas = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_meta]
        known = all(t in self.copies for t in metas)
        if func in _READS and metas:
            if not known:
                raise UnknownValue(f"{self.where()} reads a tensor's value ({func.__name__}) that depends on the "
                                   f"weights or the batch, which the meta device does not have; the dry run's "
                                   f"activation measurement cannot run it")
            return func(*self._real(args), **self._real(kwargs))
        if not known or func in _UNINITIALISED:
            out = func(*args, **kwargs)
            self._forget_written(func, args, kwargs)
            return out
        try:
            out = func(*args, **kwargs)  # meta first: its shapes say whether a real copy is affordable
        except (NotImplementedError, RuntimeError):  # a meta kernel that needs values: the copy has them
            out = None
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_meta]
        if out is not None and (not made or any(t.numel() > MAX_ELEMENTS for t in made)):
            for t in made:  # CPU-only ops need no copy; a huge result gets none
                self.copies.pop(t, None)
            return out
        real = func(*self._real(args), **self._real(kwargs))
        out = tree_map(_meta_like, real) if out is None else out
        for o, r in zip(tree_flatten(out)[0], tree_flatten(real)[0], strict=True):
            if isinstance(o, torch.Tensor) and o.is_meta:
                self.copies[o] = r
        return out

    def _real(self, tree: Any) -> Any:
        """`tree` with every meta tensor replaced by its copy and the meta device by the CPU."""
        def swap(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return self.copies[x] if x.is_meta else x
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return "cpu" if isinstance(x, str) and x == "meta" else x
        return tree_map(swap, tree)

    def _forget_written(self, func: Any, args: tuple, kwargs: dict) -> None:
        """Drop the copy of every tensor `func` writes into from unknown values (and of its base)."""
        for i, argument in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, torch.Tensor):
                self.copies.pop(value, None)
                if value._base is not None:
                    self.copies.pop(value._base, None)


def _meta_like(x: Any) -> Any:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x
