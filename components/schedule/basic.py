"""Step-based learning-rate shapes: constant, linear decay, warmup-stable-decay, and warmup
composed with any other schedule."""

from __future__ import annotations

import math
from typing import Literal

from tessera.components.interfaces import Schedule
from tessera.registry.invariants import invariant
from tessera.registry.kinds import SCHEDULER


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The linear warmup multiplier while `step` < `warmup_steps`, else None."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


@SCHEDULER.register("constant")
class Constant(Schedule):
    """Always `value` (1.0: the optimizer's base lr)."""

    def __init__(self, *, value: float = 1.0):
        self.value = value

    def __call__(self, step: int, tokens: int = 0) -> float:
        return self.value


@SCHEDULER.register("linear_decay")
@invariant("0 <= warmup_steps < total_steps", lambda warmup_steps, total_steps: 0 <= warmup_steps < total_steps,
           fix="use a warmup shorter than the run")
class LinearDecay(Schedule):
    """Linear warmup to 1 over `warmup_steps`, then linear decay to `min_ratio` at `total_steps`."""

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int, tokens: int = 0) -> float:
        if (warm := _warmup(step, self.warmup_steps)) is not None:
            return warm
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return 1.0 - (1.0 - self.min_ratio) * progress


@SCHEDULER.register("wsd")
@invariant("0 < decay_fraction <= 1", lambda decay_fraction: 0 < decay_fraction <= 1,
           fix="decay over a fraction of the run in (0, 1], e.g. 0.1")
class WarmupStableDecay(Schedule):
    """Warmup-stable-decay (MiniCPM, arXiv:2404.06395 §4): linear warmup, constant 1 until the
    last `decay_fraction` of `total_steps`, then a decay to `min_ratio` of `shape`: "linear",
    "cosine", or "sqrt" (1 - sqrt(progress); Hägele et al., arXiv:2405.18392 §3, find this
    cooldown ends lower than a linear one)."""

    def __init__(self, *, warmup_steps: int, total_steps: int, decay_fraction: float = 0.1, min_ratio: float = 0.0,
                 shape: Literal["linear", "cosine", "sqrt"] = "linear"):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.decay_fraction, self.min_ratio, self.shape = decay_fraction, min_ratio, shape

    def __call__(self, step: int, tokens: int = 0) -> float:
        if (warm := _warmup(step, self.warmup_steps)) is not None:
            return warm
        decay_start = self.total_steps * (1 - self.decay_fraction)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / (self.total_steps - decay_start))
        if self.shape == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.shape == "sqrt":
            return self.min_ratio + (1 - self.min_ratio) * (1 - math.sqrt(progress))
        return 1.0 - (1.0 - self.min_ratio) * progress


@SCHEDULER.register("warmup")
class Warmup(Schedule):
    """Linear warmup over `warmup_steps` in front of any schedule `then`, which starts counting
    its own steps at 0 when the warmup ends (tokens are passed through unchanged)."""

    def __init__(self, *, warmup_steps: int, then: Schedule):
        self.warmup_steps, self.then = warmup_steps, then

    def __call__(self, step: int, tokens: int = 0) -> float:
        if (warm := _warmup(step, self.warmup_steps)) is not None:
            return warm * self.then(0, tokens)
        return self.then(step - self.warmup_steps, tokens)
