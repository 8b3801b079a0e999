"""Peak bytes of live tensor storage on CPU, counted at the dispatcher (no CUDA allocator needed)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Counts every storage an op under the mode returns, once, until it is freed; `peak` is the
    largest sum seen. Storages made before the mode are not counted: enter it before the model
    is built so that parameters, gradients, optimizer state and activations all are. In-place
    storage resizes (FSDP2 frees and refills its gathered parameters that way) are followed. A
    DTensor counts as its local tensor; temporaries made and freed inside one DTensor op are
    not seen (the mode is off while DTensor runs an op on its local tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if is_traceable_wrapper_subclass(t):
            # a DTensor's own storage is a placeholder of the global size; what this process
            # holds is its local tensor (made inside DTensor's dispatch, where this mode is off)
            names, _ = t.__tensor_flatten__()
            for name in names:
                self._track(getattr(t, name))
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without one
            return
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)  # storages keep their Python object while alive

    def __enter__(self):
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int):
            key = storage._cdata
            out = original(storage, size)
            if key in tracker.live:
                tracker.current += size - tracker.live[key]
                tracker.live[key] = size
                tracker.peak = max(tracker.peak, tracker.current)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out
