"""The run's own record of the collectives it enters, for naming a hang on gloo.

While a `CollectiveRecord` is entered, the common `torch.distributed` collectives (looked up
as attributes of the module, the way the trainer, the parallel plans and FSDP2 call them)
are wrapped: each call bumps a counter and remembers its name and the step, so a watchdog
can say "last collective entered: all_reduce #123 at step 7". Synchronous calls also add
the seconds they block to `blocked_s`: on a rank that waits for a slower one, that is where
the step's time goes, so step time minus blocked time is the rank's own work.

Not seen: collectives issued from C++ (DDP's gradient buckets) and the waits on asynchronous
ones (`async_op=True`, FSDP2's prefetches). On CUDA, NCCL's flight recorder sees everything
(see `tessera.components.train.watchdog`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
           "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
           "barrier", "reduce", "gather", "scatter", "send", "recv")


@dataclasses.dataclass
class Entered:
    """The last collective a process entered: its name, its number (1-based, counted over
    the run) and the step it was entered in (-1: before the first step)."""

    name: str = ""
    number: int = 0
    step: int = -1

    def describe(self) -> str:
        return f"{self.name} #{self.number} at step {self.step}" if self.number else "none yet"


class CollectiveRecord:
    """Records every wrapped collective while entered (one record at a time per process;
    entering a second raises). `step` is set by the caller at the start of each step."""

    _active: CollectiveRecord | None = None

    def __init__(self) -> None:
        self.last = Entered()
        self.step = -1
        self.blocked_s = 0.0
        self._originals: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()  # the watchdog thread reads `last` while the main thread writes

    def __enter__(self) -> CollectiveRecord:
        if CollectiveRecord._active is not None:
            raise RuntimeError("a CollectiveRecord is already active in this process; leave it first")
        CollectiveRecord._active = self
        for name in WRAPPED:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
        CollectiveRecord._active = None

    def note(self, name: str) -> None:
        """Count a point where collectives run out of sight (issued from C++, e.g. DDP's
        gradient buckets inside the forward/backward pass) as one entered."""
        with self._lock:
            self.last = Entered(name=name, number=self.last.number + 1, step=self.step)

    def snapshot(self) -> Entered:
        """A copy of the last collective entered (safe from another thread)."""
        with self._lock:
            return dataclasses.replace(self.last)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.last = Entered(name=name, number=self.last.number + 1, step=self.step)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if not kwargs.get("async_op", False):  # an async call returns at once; its wait is not seen
                self.blocked_s += time.perf_counter() - start
            return result

        return recorded


def note_collectives(name: str) -> None:
    """`CollectiveRecord.note` on the active record, if one is (a no-op otherwise)."""
    if CollectiveRecord._active is not None:
        CollectiveRecord._active.note(name)
