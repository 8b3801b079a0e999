"""Linear warmup followed by cosine decay to a floor."""

from __future__ import annotations

import math

from tessera.components.interfaces import Schedule
from tessera.registry.invariants import invariant
from tessera.registry.kinds import SCHEDULER


@SCHEDULER.register("warmup_cosine")
@invariant("0 <= warmup_steps <= total_steps", lambda warmup_steps, total_steps: 0 <= warmup_steps <= total_steps,
           fix="use a warmup no longer than the run")
class WarmupCosine(Schedule):
    """Multiplier rising linearly from 1/warmup_steps to 1 over `warmup_steps`, then following a
    half cosine from 1 down to `min_ratio` at `total_steps`; constant `min_ratio` afterwards.
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int, tokens: int = 0) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
