"""The re-warm schedule for continued pretraining (arXiv:2403.08763 §5) against its formula
written out here, and its invalid settings refused at config time."""

from __future__ import annotations

import math

import pytest

from tessera.components.schedule.rewarm import Rewarm
from tessera.registry import SCHEDULER
from tessera.registry.errors import ConfigError
from tessera.registry.validate import validate


def reference(step: int, *, warmup: int, total: int, start: float, floor: float) -> float:
    """Linear re-warm from `start` to 1 reached at the end of step `warmup`-1, then cosine to `floor`."""
    if step < warmup:
        return start + (1 - start) * (step + 1) / warmup
    p = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2


def test_cosine_rewarm_follows_its_formula():
    schedule = Rewarm(warmup_steps=10, total_steps=110, min_ratio=0.05, start_ratio=0.0)
    for step in range(0, 130, 3):
        assert schedule(step) == pytest.approx(reference(step, warmup=10, total=110, start=0.0, floor=0.05))
    assert schedule(0) == pytest.approx(0.1)  # ~0 at the first step: 1/W of the new peak
    assert schedule(9) == pytest.approx(1.0) and schedule(60) == pytest.approx(0.525)
    assert schedule(110) == pytest.approx(0.05) and schedule(500) == pytest.approx(0.05)


def test_wsd_rewarm_holds_then_cools_down_linearly():
    schedule = Rewarm(warmup_steps=4, total_steps=100, min_ratio=0.0, start_ratio=0.2, decay="wsd",
                      decay_fraction=0.25)
    assert schedule(0) == pytest.approx(0.2 + 0.8 / 4) and schedule(3) == pytest.approx(1.0)
    assert schedule(4) == 1.0 and schedule(74) == 1.0
    assert schedule(75) == pytest.approx(1.0) and schedule(87.5) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs,named", [({"warmup_steps": 0}, "0 < warmup_steps"),
                                          ({"warmup_steps": 5, "start_ratio": 1.0}, "start_ratio"),
                                          ({"warmup_steps": 5, "decay_fraction": 0}, "decay_fraction")])
def test_bad_settings_are_config_faults(kwargs, named):
    with pytest.raises(ConfigError, match=named):
        validate(SCHEDULER.config("rewarm", total_steps=10, **kwargs))
