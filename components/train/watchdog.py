"""A watchdog per rank: a step that runs past a limit ends the run with one message naming
the ranks that did not arrive, instead of every rank hanging until the process group's
timeout (30 minutes by default) and a generic error.

Each rank runs a timer thread. When its step has run longer than the limit (explicit
`limit_s`, or `factor` x the median step so far, never under `floor_s`), the thread posts
where its rank is (the step and the last collective it entered, from `CollectiveRecord`) to
the process group's key-value store, waits up to `grace_s` for the other ranks' posts, and
the lowest rank that posted prints the one message (`hang_report`); then every rank leaves
with `os._exit(HANG_EXIT_STATUS)`, since a thread cannot pull its main thread out of a
collective. Under torchrun --max-restarts or a SLURM requeue, the job restarts from there.

On CUDA the run's own record misses collectives issued from C++; NCCL's flight recorder
sees them all: start the run with TORCH_NCCL_TRACE_BUFFER_SIZE=2000 (entries kept per rank)
and TORCH_NCCL_DUMP_ON_TIMEOUT=1 (dump to TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank> when NCCL's
own timeout fires); the watchdog also asks for that dump when it fires, where torch offers it.

The watched window is a step's forward, backward and update, not validation or checkpoint
saving. A recipe sets it as `watchdog=fdl.Config(Watchdog, floor_s=120)`; on the command
line `watchdog.limit_s=300`, `watchdog.enabled=False`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from tessera.components.train.collective_record import CollectiveRecord
from tessera.components.train.hang_report import RankReport, hang_message
from tessera.registry.invariants import invariant

HANG_EXIT_STATUS = 124
"""What every rank exits with when the watchdog fires (the `timeout` command's status)."""
_KEY = "tessera/watchdog/"


@invariant("limit_s is None or limit_s > 0", lambda limit_s: limit_s is None or limit_s > 0,
           fix="set watchdog.limit_s to a positive number of seconds, or None to derive it from the median step")
@invariant("floor_s > 0 and first_step_s > 0 and factor > 1 and grace_s >= 0",
           lambda floor_s, first_step_s, factor, grace_s: min(floor_s, first_step_s) > 0 and factor > 1
           and grace_s >= 0,
           fix="use watchdog.floor_s > 0, watchdog.first_step_s > 0, watchdog.factor > 1 and watchdog.grace_s >= 0")
@invariant("straggler_margin > 1 and straggler_steps >= 1",
           lambda straggler_margin, straggler_steps: straggler_margin > 1 and straggler_steps >= 1,
           fix="use watchdog.straggler_margin > 1 (e.g. 1.5) and watchdog.straggler_steps >= 1 (e.g. 5)")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Watchdog:
    """When a step counts as hung, and when a rank counts as a straggler.

    Args:
        enabled: run the watchdog (and the per-rank step times and straggler notes).
        limit_s: seconds a step may take; None: max(factor x median step so far, floor_s).
        floor_s: the shortest derived limit.
        first_step_s: the derived limit of the first step, which has no median yet and may
            compile and warm up for minutes.
        factor: the derived limit in median steps.
        grace_s: how long a rank whose watchdog fired waits for the other ranks' reports.
        straggler_margin: a rank whose own work exceeds the median rank's by this factor...
        straggler_steps: ...for this many consecutive steps is named in the log.
    """

    enabled: bool = True
    limit_s: float | None = None
    floor_s: float = 60.0
    first_step_s: float = 600.0
    factor: float = 10.0
    grace_s: float = 5.0
    straggler_margin: float = 1.5
    straggler_steps: int = 5

    def limit(self, durations: list[float]) -> float:
        """The limit for the next step, given the durations (seconds) of the steps so far."""
        if self.limit_s is not None:
            return self.limit_s
        if not durations:
            return max(self.first_step_s, self.floor_s)
        return max(self.factor * statistics.median(durations), self.floor_s)


class StepWatch:
    """The running watchdog of one rank (a context manager: enter before the first step).

    `begin(step)` and `end()` bracket each watched step on the main thread; the timer thread
    fires when `end` does not come within the limit."""

    def __init__(self, *, options: Watchdog, poll_s: float = 0.2) -> None:
        self.options = options
        self.record = CollectiveRecord()
        self.durations: list[float] = []
        self._poll_s = poll_s
        self._step = -1
        self._started: float | None = None
        self._limit = options.limit([])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None
        self._rank, self._world = 0, 1
        self._own_record = True

    def __enter__(self) -> StepWatch:
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world = dist.get_rank(), dist.get_world_size()
            with contextlib.suppress(Exception):  # no store: each rank reports only itself
                self._store = dist.distributed_c10d._get_default_store()
        try:
            self.record.__enter__()
        except RuntimeError:  # another run's record is active in this process (a run inside a run): share it
            self.record = CollectiveRecord._active or self.record
            self._own_record = False
        self._thread = threading.Thread(target=self._watch, name="tessera-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # never leave a joinable thread behind at teardown
        if self._own_record:
            self.record.__exit__()

    def begin(self, step: int) -> None:
        """Step `step` starts now."""
        self.record.step = step
        self.record.blocked_s = 0.0
        self._limit = self.options.limit(self.durations)
        self._step = step
        self._started = time.perf_counter()

    def end(self) -> tuple[float, float]:
        """The watched step ended: returns (its seconds, seconds blocked in recorded collectives)."""
        seconds = time.perf_counter() - (self._started or time.perf_counter())
        self._started = None
        self.durations.append(seconds)
        return seconds, self.record.blocked_s

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            started = self._started
            if started is not None and time.perf_counter() - started > self._limit:
                self._fire(time.perf_counter() - started)

    def _fire(self, seconds: float) -> None:
        """Post this rank's report, gather the others', let the lowest reporting rank print
        the message, and end the process."""
        last = self.record.snapshot()
        mine = RankReport(rank=self._rank, step=self._step, seconds=seconds, collective=last.number,
                          collective_name=last.name, collective_step=last.step)
        reports = self._exchange(mine)
        if min(r.rank for r in reports) == self._rank:
            print(hang_message(reports, world_size=self._world, limit_s=self._limit), file=sys.stderr, flush=True)
        else:  # let the printing rank finish before a launcher, seeing this rank gone, stops the rest
            time.sleep(min(2.0, self.options.grace_s))
        _dump_nccl_trace(self._rank)
        sys.stdout.flush()
        os._exit(HANG_EXIT_STATUS)

    def _exchange(self, mine: RankReport) -> list[RankReport]:
        """Every rank's report that arrives within `grace_s` (only this rank's without a store)."""
        if self._store is None or self._world == 1:
            return [mine]
        with contextlib.suppress(Exception):
            self._store.set(f"{_KEY}{self._rank}", mine.to_json())
            keys = [f"{_KEY}{r}" for r in range(self._world)]
            deadline = time.monotonic() + self.options.grace_s
            while time.monotonic() < deadline and not self._store.check(keys):
                time.sleep(0.1)
            return [RankReport.from_json(self._store.get(k)) for k in keys if self._store.check([k])]
        return [mine]


def _dump_nccl_trace(rank: int) -> None:
    """Write NCCL's flight recorder (CUDA runs with TORCH_NCCL_TRACE_BUFFER_SIZE set) to
    TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>; a no-op elsewhere or where torch lacks the call."""
    if not (torch.cuda.is_available() and os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE")):
        return
    with contextlib.suppress(Exception):  # a best-effort extra on the way out
        trace = torch._C._distributed_c10d._dump_nccl_trace()
        prefix = os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/tmp/nccl_trace_rank_")
        with open(f"{prefix}{rank}", "wb") as f:
            f.write(trace)
