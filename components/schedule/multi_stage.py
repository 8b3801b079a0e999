"""Token-based multi-stage schedules: DeepSeek-V3's LR schedule, DeepSeek LLM/V2 step decay,
and piecewise-constant values (MTP loss weight, bias update speed)."""

from __future__ import annotations

import math
from typing import Literal

from tessera.components.interfaces import Schedule
from tessera.registry.invariants import invariant
from tessera.registry.kinds import SCHEDULER

Shape = Literal["constant", "cosine", "linear"]


@SCHEDULER.register("multi_stage")
@invariant("stage boundaries increase", lambda stages: all(a[0] < b[0] for a, b in zip(stages, stages[1:])),
           fix="list stages in increasing order of their end (in tokens)")
@invariant("every stage is (end_tokens, shape, end_value) with shape constant/cosine/linear",
           lambda stages: all(len(s) == 3 and s[1] in ("constant", "cosine", "linear") for s in stages),
           fix="write stages as [(end_tokens, 'constant'|'cosine'|'linear', end_value), ...]")
class MultiStage(Schedule):
    """Linear warmup over `warmup_steps` optimizer steps, then stages bounded in tokens.

    Each stage (end_tokens, shape, end_value) runs from the previous stage's end (0 for the
    first) to `end_tokens`: "constant" holds `end_value`; "cosine"/"linear" move from the
    previous stage's value to `end_value`. After the last stage the last value holds. Values
    are multipliers of the peak (1.0 after warmup).

    DeepSeek-V3 (peak 2.2e-4, reference §3a): warmup 2000 steps; (10e12, constant, 1.0),
    (14.3e12, cosine, 0.1), (14.633e12, constant, 0.1), (14.8e12, constant, 7.3e-6 / 2.2e-4).
    DeepSeek LLM: (0.8 * total, constant, 1.0), (0.9 * total, constant, 0.316), (total, constant, 0.1).
    """

    def __init__(self, *, warmup_steps: int, stages: list[tuple[float, Shape, float]]):
        self.warmup_steps = warmup_steps
        self.stages = [tuple(stage) for stage in stages]

    def __call__(self, step: int, tokens: int = 0) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start, value = 0.0, 1.0
        for end, shape, end_value in self.stages:
            if tokens < end:
                progress = (tokens - start) / (end - start)
                if shape == "constant":
                    return end_value
                if shape == "linear":
                    return value + (end_value - value) * progress
                return end_value + (value - end_value) * 0.5 * (1 + math.cos(math.pi * progress))
            start, value = end, end_value
        return value


@SCHEDULER.register("token_steps")
@invariant("len(values) == len(boundaries) + 1", lambda values, boundaries: len(values) == len(boundaries) + 1,
           fix="give one more value than boundaries")
class TokenSteps(Schedule):
    """Piecewise-constant absolute values: values[i] until boundaries[i] tokens, values[-1] after.

    DeepSeek-V3: MTP loss weight values=[0.3, 0.1], boundaries=[10e12]; bias update speed
    values=[0.001, 0.0], boundaries=[14.3e12].
    """

    def __init__(self, *, values: list[float], boundaries: list[float]):
        self.values = values
        self.boundaries = boundaries

    def __call__(self, step: int, tokens: int = 0) -> float:
        for value, boundary in zip(self.values, self.boundaries):
            if tokens < boundary:
                return value
        return self.values[-1]
