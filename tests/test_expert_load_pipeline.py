"""The expert-load metric under pipeline parallelism covers every MoE layer of the model.

Under `@mesh(pp=2)` each process holds half the layers; the loads are gathered over the
pipeline before process 0 logs them. The DeepSeek debug model (MoE in layers 1-3 and the MTP
module, "layer 4") runs once in this process and once on 2 pipeline stages from the command
line, with the same data, weights and micro-batches: step 1 routes the same tokens to the
same experts, so the logged loads must be equal, layer by layer and in the same order.
"""

from __future__ import annotations

import json

import fiddle as fdl
import pytest

from tessera.cli import resolve
from tessera.components.train.launch import launch
from tessera.components.train.metrics import Metrics, layer_order
from tessera.recipes.deepseek_pretrain import recipe

from helpers.launch import recipe_script, torchrun

BATCH, SEQ, TOP_K = 8, 32, 2
ARGS = ["debug", "steps=2", f"batch_size={BATCH}", "step.micro_batch_size=2", f"seq_len={SEQ}", "precision=@fp32",
        "compute.threads=1", "progress=None", "validation.batches=1", "checkpoint=None"]
METRICS = {"tensorboard": False, "peak_flops": 1e11, "eval_every": 0}  # no probe, no mid-run validation


def logged(folder) -> tuple[list[dict], dict]:
    """The step rows of metrics.jsonl and summary.json in `folder`."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "expert_load" in r], json.loads((folder / "summary.json").read_text())


@pytest.mark.slow
def test_pipelined_expert_load_covers_every_moe_layer_as_one_process(tmp_path):
    config, _ = resolve(recipe, ARGS)
    config.metrics = fdl.Config(Metrics, folder=str(tmp_path / "one"), plots=False, **METRICS)
    launch(config)
    one, one_summary = logged(tmp_path / "one")

    overrides = [f"metrics.{k}={v}" for k, v in METRICS.items()]
    result = torchrun(recipe_script("deepseek_pretrain"), *ARGS, "parallel=@mesh(pp=2)",
                      f"metrics.folder={tmp_path / 'pp'}", *overrides, timeout=300,
                      env={"PYTHONFAULTHANDLER": "1"})  # a native abort prints every thread's Python stack
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    pp, pp_summary = logged(tmp_path / "pp")

    assert one_summary["moe_layers"] == pp_summary["moe_layers"] == [1, 2, 3, 4]
    assert [r["step"] for r in pp] == [1, 2]
    for row in pp:  # every MoE layer, each counting all the step's token-expert assignments
        assert len(row["expert_load"]) == 4, row
        assert [sum(layer) for layer in row["expert_load"]] == [BATCH * SEQ * TOP_K] * 3 + [BATCH * (SEQ - 1) * TOP_K]
    assert pp[0]["expert_load"] == one[0]["expert_load"]  # step 1: the same routing, layer by layer
    assert pp[0]["load_imbalance"] == pytest.approx(one[0]["load_imbalance"], rel=1e-9)
    assert (tmp_path / "pp" / "expert_load.png").stat().st_size > 1000  # the plot is written


def test_layer_order_is_the_decoders_not_the_alphabets():
    """Gathered loads are ordered by name; numbered parts must compare as numbers and the MTP
    modules come after every main layer, as `moe_layer_indices` labels them."""
    names = ["mtp.0.block.feed_forward.router", "layers.10.feed_forward.router", "layers.9.feed_forward.router",
             "mtp.1.block.feed_forward.router", "layers.2.feed_forward.router"]
    assert sorted(names, key=layer_order) == [names[4], names[2], names[1], names[0], names[3]]
