"""Profiling chosen steps: `metrics.profile=START:STOP` records steps START to STOP (counted
from 1, both included) with torch.profiler and writes a Chrome / Perfetto trace into the
metrics folder (`trace-steps-START-STOP.json`; open it in https://ui.perfetto.dev or
chrome://tracing); on CUDA, also a memory snapshot of the same steps
(`memory-steps-START-STOP.pickle`, for https://pytorch.org/memory_viz). Only the main
process profiles. Outside those steps the profiler is off and costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["StepProfiler", "parse_steps", "step_profiler", "valid_steps"]

_MEMORY_EVENTS = 100_000  # allocation events the CUDA memory history keeps (oldest dropped first)


def parse_steps(spec: str | int | None) -> tuple[int, int] | None:
    """`"START:STOP"` (or one step `"N"`) -> (START, STOP), 1-based and inclusive; None -> None.
    ValueError, with the form expected, for anything else."""
    if spec is None or spec == "":
        return None
    text = str(spec).strip()
    start, _, stop = text.partition(":")
    try:
        first, last = int(start), int(stop if stop else start)
    except ValueError:
        raise ValueError(f"metrics.profile={spec!r} is not START:STOP; write e.g. metrics.profile=3:5 "
                         f"(steps counted from 1, both included)") from None
    if not 1 <= first <= last:
        raise ValueError(f"metrics.profile={spec!r} needs 1 <= START <= STOP; write e.g. metrics.profile=3:5")
    return first, last


def valid_steps(spec: str | int | None) -> bool:
    """Whether `parse_steps` accepts `spec` (for the config's validation pass)."""
    try:
        parse_steps(spec)
    except ValueError:
        return False
    return True


class StepProfiler:
    """Profiles steps `first`..`last` (1-based) of a run into `folder`; `device`: the run's
    device type ("cuda" adds GPU activity and the memory snapshot)."""

    def __init__(self, *, first: int, last: int, folder: Path, device: str) -> None:
        self.first, self.last, self.folder = first, last, Path(folder)
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self._profile: profile | None = None
        self.trace: Path | None = None
        """Where the trace was written, once it was."""

    @contextlib.contextmanager
    def step(self, step: int, *, final: bool = False) -> Iterator[None]:
        """Around optimizer step `step` (1-based); `final`: the run's last step (the trace is
        written then if STOP lies beyond it)."""
        if step == self.first:
            self._start()
        if self._profile is None:
            yield
            return
        with record_function(f"step {step}"):  # one span per step in the trace
            yield
        if step == self.last or final:
            self._finish()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profile = profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profile.start()
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_EVENTS)

    def _finish(self) -> None:
        assert self._profile is not None
        self._profile.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"steps-{self.first}-{self.last}"
        self.trace = self.folder / f"trace-{name}.json"
        self._profile.export_chrome_trace(str(self.trace))
        written = [str(self.trace)]
        if self.cuda:
            snapshot = self.folder / f"memory-{name}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(str(snapshot))
        self._profile = None
        Console(stderr=True).print(f"profile: wrote {' and '.join(written)}", highlight=False, soft_wrap=True)


def step_profiler(spec: str | int | None, *, folder: Path, device: str) -> StepProfiler | None:
    """The profiler `metrics.profile` asks for (None: profiling is off)."""
    steps = parse_steps(spec)
    return None if steps is None else StepProfiler(first=steps[0], last=steps[1], folder=folder, device=device)
