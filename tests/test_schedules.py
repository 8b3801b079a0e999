"""Every schedule against values computed by hand, and the DeepSeek hyperparameter laws."""

from __future__ import annotations

import math

import pytest

from tessera.components.schedule.basic import Constant, LinearDecay, Warmup, WarmupStableDecay
from tessera.components.schedule.multi_stage import MultiStage, TokenSteps
from tessera.components.schedule.scaling import (
    deepseek_llm_compute,
    deepseek_llm_optimal_batch_tokens,
    deepseek_llm_optimal_lr,
    sqrt_batch_lr,
)
from tessera.components.schedule.warmup_cosine import WarmupCosine


def test_step_schedules():
    assert Constant(value=0.5)(123) == 0.5
    lin = LinearDecay(warmup_steps=10, total_steps=110, min_ratio=0.0)
    assert lin(4) == pytest.approx(0.5) and lin(10) == 1.0 and lin(60) == pytest.approx(0.5) and lin(200) == 0.0
    wsd = WarmupStableDecay(warmup_steps=10, total_steps=100, decay_fraction=0.2, min_ratio=0.1)
    assert wsd(9) == 1.0 and wsd(50) == 1.0 and wsd(80) == 1.0
    assert wsd(90) == pytest.approx(1 - 0.9 * 0.5) and wsd(100) == pytest.approx(0.1)
    cos = WarmupStableDecay(warmup_steps=0, total_steps=100, decay_fraction=0.5, shape="cosine")
    assert cos(75) == pytest.approx(0.5)
    composed = Warmup(warmup_steps=4, then=Constant(value=0.8))
    assert composed(1) == pytest.approx(0.4) and composed(10) == 0.8
    wc = Warmup(warmup_steps=5, then=WarmupCosine(warmup_steps=0, total_steps=100, min_ratio=0.0))
    assert wc(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_deepseek_v3_token_boundaries():
    v3 = MultiStage(warmup_steps=2000, stages=[(10e12, "constant", 1.0), (14.3e12, "cosine", 0.1),
                                              (14.633e12, "constant", 0.1), (14.8e12, "constant", 7.3e-6 / 2.2e-4)])
    peak = 2.2e-4
    assert v3(999, 0) * peak == pytest.approx(2.2e-4 * 1000 / 2000)
    assert v3(5000, 9.99e12) * peak == pytest.approx(2.2e-4)
    assert v3(5000, 12.15e12) * peak == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
    assert v3(5000, 14.3e12) * peak == pytest.approx(2.2e-5)
    assert v3(5000, 14.5e12) * peak == pytest.approx(2.2e-5)
    assert v3(5000, 14.7e12) * peak == pytest.approx(7.3e-6)
    assert v3(5000, 20e12) * peak == pytest.approx(7.3e-6)
    step_decay = MultiStage(warmup_steps=2000, stages=[(1.6e12, "constant", 1.0), (1.8e12, "constant", 0.316),
                                                      (2e12, "constant", 0.1)])
    assert [step_decay(3000, t) for t in (1e12, 1.7e12, 1.9e12)] == [1.0, 0.316, 0.1]
    mtp = TokenSteps(values=[0.3, 0.1], boundaries=[10e12])
    assert mtp(0, 9e12) == 0.3 and mtp(0, 10e12) == 0.1


def test_hyperparameter_laws_reproduce_the_papers_settings():
    assert sqrt_batch_lr(1e-3, 256, 1024) == pytest.approx(2e-3)
    # Reference §2c: DeepSeek LLM 7B: C = M * 2T -> eta_opt 4.25e-4 and B_opt 9.22M tokens
    c7 = deepseek_llm_compute(30, 4096, 4096, 2e12)
    assert deepseek_llm_optimal_lr(c7) == pytest.approx(4.25e-4, rel=0.01)
    assert deepseek_llm_optimal_batch_tokens(c7) == pytest.approx(9.22e6, rel=0.01)
    c67 = deepseek_llm_compute(95, 8192, 4096, 2e12)
    assert deepseek_llm_optimal_lr(c67) == pytest.approx(3.12e-4, rel=0.01)
    assert deepseek_llm_optimal_batch_tokens(c67) == pytest.approx(20.65e6, rel=0.01)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_matches_the_minicpm_formula_at_every_step(shape):
    """Warmup-stable-decay (MiniCPM, arXiv:2404.06395 §4: linear warmup, constant peak, then a
    decreasing f over the decay phase; f linear or half-cosine here) written out per phase."""
    warmup, total, fraction, floor = 7, 60, 0.25, 0.05
    decay_start = total * (1 - fraction)  # 45: the last quarter decays

    def naive(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        t = min(step - decay_start, total - decay_start) / (total - decay_start)
        falloff = t if shape == "linear" else (1 - math.cos(math.pi * t)) / 2
        return 1.0 - (1.0 - floor) * falloff

    wsd = WarmupStableDecay(warmup_steps=warmup, total_steps=total, decay_fraction=fraction, min_ratio=floor,
                            shape=shape)
    assert [wsd(s) for s in range(total + 10)] == pytest.approx([naive(s) for s in range(total + 10)])


def test_wsd_sqrt_cooldown_follows_one_minus_sqrt_of_progress():
    """arXiv:2405.18392 §3's cooldown: after the stable phase, min + (1 - min)(1 - sqrt(p))."""
    wsd = WarmupStableDecay(warmup_steps=0, total_steps=100, decay_fraction=0.5, min_ratio=0.1, shape="sqrt")
    assert wsd(50) == 1.0
    for step in (50, 60, 75, 99, 100):
        progress = (step - 50) / 50
        assert wsd(step) == pytest.approx(0.1 + 0.9 * (1 - progress ** 0.5))
    assert wsd(75) < WarmupStableDecay(warmup_steps=0, total_steps=100, decay_fraction=0.5, min_ratio=0.1)(75)
