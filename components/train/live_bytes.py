"""The most bytes of tensor storage alive at once on the CPU, counted as ops return them (no
allocator statistics needed): how a CPU trial step's peak is measured."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """While entered, every storage an op returns is counted once until it is freed; `peak`
    is the largest total seen. `held`: tensors that exist already (weights, buffers), counted
    from the start; other storages made before entering are not seen, and a view of one
    (`weight.t()`) must not count it, so pass every tensor that ops will view. A DTensor
    counts as its local shard, which is what this process holds. In-place resizes (how FSDP2
    frees and refills gathered parameters) move the count too."""

    def __init__(self, *, held: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self._sizes: dict[int, int] = _storages(held)
        self.current = self.peak = sum(self._sizes.values())

    def _count(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if is_traceable_wrapper_subclass(t):  # the placeholder storage is the global size: count the parts
            for name in t.__tensor_flatten__()[0]:
                self._count(getattr(t, name))
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage._cdata
        if key not in self._sizes:
            self._grow(key, storage.nbytes())
            weakref.finalize(storage, self._release, key)

    def _grow(self, key: int, size: int) -> None:
        self.current += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_
        counter = self

        def counted_resize(storage: torch.UntypedStorage, size: int):
            out = resize(storage, size)
            if storage._cdata in counter._sizes:
                counter._grow(storage._cdata, size)
            return out

        torch.UntypedStorage.resize_ = counted_resize  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._count(t)
        return out


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: its local shard)."""
    return sum(_storages(tensors).values())


def _storages(tensors: list[torch.Tensor]) -> dict[int, int]:
    """Each distinct storage behind `tensors` (meta ones skipped) and its bytes."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.device.type != "meta":
            storage = local.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return seen
