"""Loss-spike and non-finite guard: skip bad updates, roll back after repeated ones, and stop a
run that cannot recover with `TrainingDiverged` (the recipes' command line exits non-zero)."""

from __future__ import annotations

import math

from tessera.registry.invariants import invariant


class TrainingDiverged(FloatingPointError):
    """A run whose loss or gradients went non-finite (or kept spiking) and did not recover.

    The message names the step, what went bad, and what to change in the config."""


@invariant("max_bad_steps >= 1 and spike_factor > 1 and window >= 1 and max_rollbacks >= 0",
           lambda max_bad_steps, spike_factor, window, max_rollbacks:
           max_bad_steps >= 1 and spike_factor > 1 and window >= 1 and max_rollbacks >= 0,
           fix="allow at least one bad step, a spike factor > 1, a window of at least one step and "
               "max_rollbacks >= 0")
class StabilityGuard:
    """Judges each step before the optimizer update.

    A step is bad when its loss or gradient norm is not finite, when its gradient norm is
    exactly 0 (the loss no longer depends on any weight: a dead model, which a bounded update
    such as Muon's reaches at too high a learning rate without the loss ever spiking: the
    weights grow until an RMSNorm's squares overflow and it outputs zeros), or when its loss exceeds
    `spike_factor` times the mean of the last `window` good losses (judged from the second
    step on: the first step's loss, about ln(vocabulary) at initialisation, is the reference).
    A bad step's update is skipped (gradients dropped). After `max_bad_steps` consecutive bad
    steps the trainer rolls back to the last checkpoint this run wrote or loaded, skipping past
    the offending batches, when `rollback` and such a checkpoint exist; it stops with
    `TrainingDiverged` when there is none, or after `max_rollbacks` rollbacks.

    The defaults are chosen, not taken from a paper: 3x the recent mean is far above the
    step-to-step noise of a healthy run (a few percent) and far below a divergence (10-1000x).
    """

    def __init__(self, *, max_bad_steps: int = 3, spike_factor: float = 3.0, window: int = 20,
                 rollback: bool = True, max_rollbacks: int = 3):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.window = window
        self.rollback = rollback
        self.max_rollbacks = max_rollbacks
        self.recent: list[float] = []
        self.consecutive_bad = 0
        self.skipped = 0
        self.rollbacks = 0
        self.reason = ""
        """Why the last bad step was judged bad (empty until one is)."""

    def check(self, loss: float, grad_norm: float) -> bool:
        """True when the step may update the weights; records the verdict (and `reason`)."""
        mean = sum(self.recent) / len(self.recent) if self.recent else math.inf
        if not math.isfinite(loss):
            self.reason = f"the loss was {loss}"
        elif not math.isfinite(grad_norm):
            self.reason = f"the gradient norm was {grad_norm} (the loss, {loss:.4g}, was finite)"
        elif grad_norm == 0.0:
            self.reason = (f"the gradient norm was exactly 0 at a loss of {loss:.4g}: the loss no longer depends "
                           f"on the weights (activations overflowed or vanished inside the model)")
        elif loss > self.spike_factor * mean:
            self.reason = (f"the loss spiked to {loss:.4g}, above {self.spike_factor:g}x the mean of the last "
                           f"{len(self.recent)} good steps ({mean:.4g})")
        else:
            self.consecutive_bad = 0
            self.recent = (self.recent + [loss])[-self.window:]
            return True
        self.consecutive_bad += 1
        self.skipped += 1
        return False

    def state_dict(self) -> dict:
        """The running state (saved with checkpoints so a resumed run judges steps the same way)."""
        return {"recent": list(self.recent), "consecutive_bad": self.consecutive_bad, "skipped": self.skipped,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.recent = list(state["recent"])
        self.consecutive_bad, self.skipped = state["consecutive_bad"], state["skipped"]
        self.rollbacks = state["rollbacks"]

    @property
    def exhausted(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps

    @property
    def may_roll_back(self) -> bool:
        """Whether another rollback is allowed (a checkpoint must also exist)."""
        return self.rollback and self.rollbacks < self.max_rollbacks
