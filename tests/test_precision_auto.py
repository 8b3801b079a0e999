"""Precision `auto` on either kind of machine, the slow-precision warning, and the time-boxed,
cached matmul probe. Both branches are tested on every machine: the capability and the
probe's ratio are forced, by `TESSERA_FAST_BF16` or by replacing them."""

from __future__ import annotations

import json
import time
import warnings

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.precision import auto, probe
from tessera.components.precision.policies import FP32, BF16Autocast, BF16Params, FP16Autocast
from tessera.components.train.launch import launch
from tessera.components.train.metrics import Metrics
from tessera.recipes.llama_pretrain import recipe


def fake_machine(monkeypatch, *, native: bool, ratio: float) -> None:
    """A machine whose bf16 / fp16 capability is `native` and whose probe measures `ratio`."""
    monkeypatch.delenv(auto.FORCE_ENV, raising=False)
    monkeypatch.setattr(auto, "capability", lambda dtype, device: auto.Capability(
        native, "this CPU has AMX" if native else "this CPU (AVX2) has no AMX or AVX512-BF16"))
    monkeypatch.setattr(auto, "speedup", lambda dtype, device: ratio)


def test_auto_picks_fp32_where_bf16_is_slow_and_says_by_how_much(monkeypatch):
    fake_machine(monkeypatch, native=False, ratio=1 / 38)
    policy, why = auto.Auto().resolve("cpu")
    assert isinstance(policy, FP32)
    assert why.startswith("fp32") and "38x slower" in why and "AVX2" in why


def test_auto_picks_bf16_where_the_cpu_has_native_bf16(monkeypatch):
    fake_machine(monkeypatch, native=True, ratio=4.5)
    policy, why = auto.Auto().resolve("cpu")
    assert isinstance(policy, BF16Autocast)
    assert "4.5x faster" in why and "AMX" in why


def test_auto_trusts_the_probe_over_the_capability_flag(monkeypatch):
    fake_machine(monkeypatch, native=True, ratio=0.5)  # instructions present but not used (VM, build)
    policy, why = auto.Auto().resolve("cpu")
    assert isinstance(policy, FP32) and "2x slower" in why


@pytest.mark.parametrize(("forced", "expected"), [("1", BF16Autocast), ("0", FP32)])
def test_environment_forces_the_capability_either_way(monkeypatch, forced, expected):
    monkeypatch.setenv(auto.FORCE_ENV, forced)
    monkeypatch.setattr(auto, "speedup", lambda *a: pytest.fail("a forced choice runs no probe"))
    policy, why = auto.Auto().resolve("cpu")
    assert isinstance(policy, expected) and auto.FORCE_ENV in why


@pytest.mark.parametrize("policy", [BF16Autocast(), FP16Autocast(), BF16Params()])
def test_explicit_half_precision_on_a_slow_cpu_runs_with_one_warning(monkeypatch, policy):
    fake_machine(monkeypatch, native=False, ratio=1 / 40)
    with pytest.warns(auto.SlowPrecisionWarning, match="40x slower than fp32") as caught:
        chosen, why = auto.resolve(policy, "cpu")
    slow = [w for w in caught if issubclass(w.category, auto.SlowPrecisionWarning)]  # not torch's own deprecations
    assert chosen is policy and len(slow) == 1 and "40x slower" in why


def test_explicit_precision_the_device_runs_fast_is_silent(monkeypatch):
    fake_machine(monkeypatch, native=True, ratio=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto.resolve(BF16Autocast(), "cpu")[0].compute_dtype == torch.bfloat16
        assert auto.resolve(FP32(), "cpu")[1] == "fp32"


@pytest.mark.parametrize(("forced", "word"), [("0", "fp32"), ("1", "bf16 autocast")])
def test_run_says_what_auto_chose_first_and_in_its_summary(tmp_path, monkeypatch, capsys, forced, word):
    monkeypatch.setenv(auto.FORCE_ENV, forced)
    config, _ = resolve(recipe, ["debug", "compute.threads=1", "steps=2", "batch_size=2", "seq_len=32",
                                 "checkpoint=None"])
    config.metrics = fdl.Config(Metrics, folder=str(tmp_path), peak_flops=1e11, tensorboard=False, plots=False)
    launch(config)
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first.startswith(f"precision: {word}"), first
    assert json.loads((tmp_path / "summary.json").read_text())["precision"].startswith(word)


def test_the_real_probe_is_time_boxed_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        start = time.perf_counter()
        flops = probe.matmul_flops(dtype, budget_s=0.1, cache=False)
        # Bounded by the budget plus one over-run of the last size (the next is predicted 8x).
        assert time.perf_counter() - start < 1.0 and flops > 0, dtype


def test_probe_is_cached_per_machine_and_keeps_the_best_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    real_measure = probe._measure
    measured = iter([5e9, 9e9, 2e9])  # first run: 5; later a quiet 9, then a loaded 2
    budgets = []

    def fake_measure(dtype, device, budget_s):
        budgets.append(budget_s)
        return next(measured)

    monkeypatch.setattr(probe, "_measure", fake_measure)
    assert probe.matmul_flops(torch.bfloat16, budget_s=0.3) == 5e9
    assert probe.matmul_flops(torch.bfloat16, budget_s=0.3) == 9e9
    assert probe.matmul_flops(torch.bfloat16, budget_s=0.3) == 9e9  # a loaded refresh never lowers it
    assert budgets == [0.3, probe.REFRESH_S, probe.REFRESH_S]  # cached: only the short refresh is paid
    stored = json.loads(probe.cache_path().read_text())
    assert list(stored.values()) == [9e9] and "bfloat16" in next(iter(stored))
    threads = torch.get_num_threads()
    try:  # the one-thread rate scales with the caller's threads; the probe leaves them as they were
        torch.set_num_threads(2)
        monkeypatch.setattr(probe, "_measure", real_measure)
        monkeypatch.setattr(probe, "_measure_sizes", lambda *a: 1e9)
        assert probe.matmul_flops(torch.bfloat16) == 2 * 9e9 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("damage", ["[1, 2]", "{not json", '{"KEY": "fast"}', '{"KEY": -5}', ""])
def test_a_damaged_cache_is_measured_anew_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    key = f"{probe.machine_key('cpu')}|{torch.bfloat16}"
    probe.cache_path().write_text(damage.replace("KEY", key.replace('"', '\\"')))
    monkeypatch.setattr(probe, "_measure", lambda dtype, device, budget_s: 7e9)
    assert probe.matmul_flops(torch.bfloat16) == 7e9
    assert json.loads(probe.cache_path().read_text())[key] == 7e9


def test_probe_never_draws_from_the_run_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    probe.matmul_flops(torch.float32, budget_s=0.02, cache=False)
    assert torch.equal(torch.get_rng_state(), before)
