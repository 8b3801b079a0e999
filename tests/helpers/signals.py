"""A schedule that sends its own process a signal at a given step (preemption tests)."""

from __future__ import annotations

import os
import signal
import time

from tessera.components.interfaces import Schedule


class SignalAt(Schedule):
    """A constant learning-rate schedule, read once at the start of every step, that sends this
    process SIGTERM at step `step` (0-based), as a cluster would mid-step."""

    def __init__(self, *, step: int):
        self.step = step

    def __call__(self, step: int, tokens: int = 0) -> float:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # let the handler run
        return 1.0
