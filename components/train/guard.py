"""Loss-spike and non-finite guard: skip bad updates, and after too many in a row roll back."""

from __future__ import annotations

import math

from registry.invariants import invariant


@invariant("max_bad_steps >= 1 and spike_factor > 1 and window >= 1", lambda max_bad_steps, spike_factor, window:
           max_bad_steps >= 1 and spike_factor > 1 and window >= 1,
           fix="allow at least one bad step, a spike factor > 1 and a window of at least one step")
class StabilityGuard:
    """Judges each step before the optimizer update.

    A step is bad when its loss or gradient norm is not finite, or when its loss exceeds
    `spike_factor` times the running mean of the last `window` good losses. A bad step's
    update is skipped (gradients dropped). After `max_bad_steps` consecutive bad steps the
    trainer rolls back to the last checkpoint and skips past the offending batches when
    `rollback` and a checkpoint exist, and otherwise stops with an error.
    """

    def __init__(self, *, max_bad_steps: int = 3, spike_factor: float = 3.0, window: int = 20, rollback: bool = True):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.window = window
        self.rollback = rollback
        self.recent: list[float] = []
        self.consecutive_bad = 0
        self.skipped = 0
        self.rollbacks = 0

    def check(self, loss: float, grad_norm: float) -> bool:
        """True when the step may update the weights; records the verdict."""
        enough = self.recent and len(self.recent) >= max(1, self.window // 2)
        mean = sum(self.recent) / len(self.recent) if enough else math.inf
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > self.spike_factor * mean
        if bad:
            self.consecutive_bad += 1
            self.skipped += 1
            return False
        self.consecutive_bad = 0
        self.recent = (self.recent + [loss])[-self.window:]
        return True

    def state_dict(self) -> dict:
        """The running state (saved with checkpoints so a resumed run judges steps the same way)."""
        return {"recent": list(self.recent), "consecutive_bad": self.consecutive_bad, "skipped": self.skipped,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.recent = list(state["recent"])
        self.consecutive_bad, self.skipped, self.rollbacks = state["consecutive_bad"], state["skipped"], state["rollbacks"]

    @property
    def exhausted(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps
