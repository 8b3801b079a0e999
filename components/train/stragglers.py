"""Naming a slow rank: one whose own work per step exceeds the median of the other ranks' by a
margin for several steps in a row. (The median of the *other* ranks: with two ranks the median
of all is their mean, which no rank can reach twice of.)

A rank's own work is its step time minus the time it blocked in collectives waiting for the
others (see `collective_record`): in a synchronous step every rank's wall time is the slowest
rank's, so only the work time tells the ranks apart.
"""

from __future__ import annotations

import statistics


class StragglerTracker:
    """Feeds on each step's per-rank work times; says when a rank has been slower than
    `margin` x the median of the other ranks for `steps` consecutive steps (once per streak)."""

    def __init__(self, *, margin: float, steps: int) -> None:
        if margin <= 1.0 or steps < 1:
            raise ValueError(f"straggler margin must be > 1 and steps >= 1 (got margin={margin}, steps={steps}); "
                             "set watchdog.straggler_margin (e.g. 1.5) and watchdog.straggler_steps (e.g. 5)")
        self.margin = margin
        self.steps = steps
        self._ratios: dict[int, list[float]] = {}

    def observe(self, work_s: list[float]) -> list[str]:
        """`work_s[r]`: rank r's own work in the latest step, in seconds. Returns one line per
        rank whose streak of slow steps reached `steps` with this step (usually none)."""
        notes = []
        for rank, seconds in enumerate(work_s):
            others = work_s[:rank] + work_s[rank + 1:]
            median = statistics.median(others) if others else seconds
            ratio = seconds / median if median > 0 else 1.0
            streak = self._ratios.setdefault(rank, [])
            if ratio <= self.margin:
                streak.clear()
                continue
            streak.append(ratio)
            if len(streak) == self.steps:
                mean = sum(streak) / len(streak)
                notes.append(f"straggler: rank {rank} took {mean:.1f}x the median step time for the last "
                             f"{self.steps} steps (its own work, without waiting for other ranks)")
        return notes
