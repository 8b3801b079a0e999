"""Run metrics (JSONL, TensorBoard, MFU, MoE load, validation bits per byte, summary, plots) and
the out-of-memory advice."""

from __future__ import annotations

import json
import math

import fiddle as fdl
import pytest

from tessera.cli import resolve
from tessera.components.moe.moe import MoE
from tessera.components.train.launch import launch
from tessera.components.train.metrics import Metrics, expert_load_figure
from tessera.recipes.deepseek_pretrain import recipe as deepseek
from tessera.recipes.llama_pretrain import recipe as llama

from helpers.stdlib_bytes import StdlibBytes


def test_deepseek_run_writes_metrics_summary_and_plots(tmp_path):
    config, _ = resolve(deepseek, ["debug", "steps=4", "batch_size=2", "seq_len=64", "progress=None",
                                   "compute.threads=1", "scheduler.warmup_steps=1", "scheduler.total_steps=4"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    config.metrics = fdl.Config(Metrics, folder=str(tmp_path / "run"), eval_every=2, peak_flops=1e11,
                                device_watts=100.0, price_per_kwh=0.3)
    result = launch(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "mfu" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    first = steps[0]
    assert {"loss", "mtp", "balance", "lr", "grad_norm", "tokens_per_second", "expert_load",
            "load_imbalance"} <= set(first)
    assert len(first["expert_load"]) == 4 and sum(first["expert_load"][0]) == 2 * 64 * 2  # 3 main + 1 MTP layers
    assert first["mfu"] == pytest.approx(first["tokens_per_second"] * _flops(result.model, 64) / 1e11, rel=1e-6)
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val][:2] == [2, 4]
    assert val[0]["val_bpb"] == pytest.approx(val[0]["val_loss"] / math.log(2), rel=1e-9)  # 1 byte per token
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["energy_kwh"] == pytest.approx(100.0 * summary["seconds"] / 3.6e6)
    assert summary["energy_cost"] == pytest.approx(summary["energy_kwh"] * 0.3)
    # The plot's rows carry the real layer indices: the debug model's layer 0 is dense.
    moe_layers = [i for i, layer in enumerate(config.model.layers) if fdl.get_callable(layer.feed_forward) is MoE]
    moe_layers += [len(config.model.layers) + k for k in range(len(config.model.mtp))]  # MTP: after the last
    assert moe_layers == [1, 2, 3, 4] and summary["moe_layers"] == moe_layers
    figure = expert_load_figure([r["expert_load"] for r in steps], summary["moe_layers"])
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["1", "2", "3", "4"]
    assert list(figure.axes[0].get_yticks()) == [0, 1, 2, 3]  # one tick per row, no fractional ones
    for png in ("loss.png", "lr.png", "expert_load.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def _flops(model, seq_len):
    from tessera.components.model.stats import training_flops_per_token

    return training_flops_per_token(model, seq_len)


def test_out_of_memory_names_the_switches():
    config, _ = resolve(llama, ["debug", "steps=2", "batch_size=2", "seq_len=32", "progress=None", "compute.threads=1"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    built = fdl.build(config)
    model = fdl.build(config.model)

    def allocate(module, inputs, output):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")

    model.layers[0].register_forward_hook(allocate)
    with pytest.raises(MemoryError, match="checkpoint_activations=True.*micro_batch_size"):
        built.func(**{**built.keywords, "model": model})


class FakeWandb:
    """Stands in for the `wandb` package: records what the run sends it."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step):
        self.logged.append((step, dict(row)))

    def finish(self):
        self.finished += 1


def _small_llama_run(tmp_path, **metrics):
    config, _ = resolve(llama, ["debug", "steps=3", "batch_size=2", "seq_len=32", "progress=None", "compute.threads=1",
                                "scheduler.warmup_steps=1", "scheduler.total_steps=3"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    config.metrics = fdl.Config(Metrics, folder=str(tmp_path / "run"), peak_flops=1e11, tensorboard=False,
                                plots=False, **metrics)
    return launch(config)


def test_wandb_receives_every_logged_row(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    _small_llama_run(tmp_path, wandb_project="tessera-test")
    assert fake.inits == [{"project": "tessera-test", "dir": str(tmp_path / "run")}] and fake.finished == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in fake.logged] == [r["step"] for r in rows]
    assert [row["loss"] for _, row in fake.logged] == [r["loss"] for r in rows]


def test_missing_wandb_is_a_note_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb -> ImportError
    result = _small_llama_run(tmp_path, wandb_project="tessera-test")
    assert len(result.losses) == 3
    assert "W&B logging is off" in capsys.readouterr().err
