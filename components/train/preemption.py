"""Stopping cleanly when asked to: SIGTERM (what clusters send before they kill a job) or Ctrl-C.

The first signal only raises a flag; the run finishes the step it is in, writes a checkpoint,
says where, and ends with `RunInterrupted`. With several processes the flag is agreed on after
every step (one all-reduce of a single number), so all ranks stop after the same step even
when the signal reached them at different moments. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import torch


class RunInterrupted(Exception):
    """The run stopped early on a signal, after saving. `signum` is the signal's number, so
    the process can exit with the conventional status 128 + signum."""

    def __init__(self, message: str, *, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """While entered, SIGTERM and SIGINT ask the run to stop after the current step.

    Handlers can only be installed from the main thread; elsewhere (a run started from a
    worker thread) signals keep their usual effect."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.signum = self.signum or signum

    def agreed(self, device: str) -> int:
        """The signal any process received so far (0: none), the same on every process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
                torch.distributed.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def interrupted_message(signum: int, step: int, steps: int, saved: Path | None) -> str:
    """What a run stopped by `signum` after `step` of `steps` says: where its progress went
    (`saved`: the checkpoint it wrote; None: it writes none) and how to continue."""
    name = signal.Signals(signum).name
    if saved is None:
        return (f"stopped by {name} after step {step} of {steps}; this run writes no checkpoints (set `checkpoint`), "
                f"so its progress is not saved")
    return f"stopped by {name} after step {step} of {steps}; checkpoint written to {saved}; continue with --resume"
