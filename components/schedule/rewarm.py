"""Re-warming and re-decaying the learning rate for continued pretraining.

A released checkpoint ends its schedule at a small learning rate. Continuing it on new data
works best by warming the rate up again, from about zero to a new peak over a short warmup,
then decaying it again over the new run (Ibrahim et al. 2024, "Simple and Scalable Strategies
to Continually Pre-train Large Language Models", arXiv:2403.08763 §5: re-warming and
re-decaying; Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to
(re)warm your model?", arXiv:2308.04014). The peak is the optimizer's lr; this schedule is
its multiplier.
"""

from __future__ import annotations

import math
from typing import Literal

from tessera.components.interfaces import Schedule
from tessera.registry.invariants import invariant
from tessera.registry.kinds import SCHEDULER


@SCHEDULER.register("rewarm")
@invariant("0 < warmup_steps < total_steps", lambda warmup_steps, total_steps: 0 < warmup_steps < total_steps,
           fix="re-warm over a positive number of steps shorter than the run (about 1% of it)")
@invariant("0 <= start_ratio < 1 and 0 <= min_ratio <= 1",
           lambda start_ratio, min_ratio: 0 <= start_ratio < 1 and 0 <= min_ratio <= 1,
           fix="start the re-warm below the peak (start_ratio in [0, 1)) and end in [0, 1] of it")
@invariant("0 < decay_fraction <= 1", lambda decay_fraction: 0 < decay_fraction <= 1,
           fix="cool down over a fraction of the run in (0, 1], e.g. 0.2")
class Rewarm(Schedule):
    """The multiplier at optimizer step s (0-based) of a run of `total_steps` T, warmup W:

    - re-warm, s < W: start + (1 - start) (s + 1) / W, a line from `start_ratio` (about 0) to 1;
    - "cosine" decay, s >= W: min + (1 - min) (1 + cos(pi p)) / 2 with p = min(1, (s - W) / (T - W));
    - "wsd" (warmup-stable-decay, the paper's infinite-schedule variant): 1 until the last
      `decay_fraction` of the run, then a line down to `min_ratio` at T;

    constant `min_ratio` after T."""

    def __init__(self, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1, start_ratio: float = 0.0,
                 decay: Literal["cosine", "wsd"] = "cosine", decay_fraction: float = 0.2):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_ratio, self.start_ratio = min_ratio, start_ratio
        self.decay, self.decay_fraction = decay, decay_fraction

    def __call__(self, step: int, tokens: int = 0) -> float:
        if step < self.warmup_steps:
            return self.start_ratio + (1 - self.start_ratio) * (step + 1) / self.warmup_steps
        if self.decay == "wsd":
            cooldown_start = max(self.warmup_steps, self.total_steps * (1 - self.decay_fraction))
            if step < cooldown_start:
                return 1.0
            progress = min(1.0, (step - cooldown_start) / max(1e-9, self.total_steps - cooldown_start))
            return 1.0 - (1.0 - self.min_ratio) * progress
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
