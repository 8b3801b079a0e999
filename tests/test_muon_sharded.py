"""Muon with the flagship model under sharded layouts: each run must train as one process does.

Muon orthogonalises whole matrices (Newton-Schulz on G G^T), so a sharded parameter's update
is not the update of its shard: under FSDP (rows of each matrix on each process) and tensor
parallelism the parameters are DTensors and the iteration must see the whole matrix. Under
expert parallelism each process holds whole experts. The reference is the same recipe on one
process; the iteration runs in fp32 so that the comparison is not bf16 rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.cli import resolve
from tessera.components.train.launch import launch
from tessera.recipes import deepseek_pretrain

from helpers.forked_ranks import run_ranks
from helpers.launch import worker
from helpers.worker_outputs import merged_weights

ARGS = ["debug", "batch_size=8", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "validation.batches=0", "steps=4", "scheduler.total_steps=6", "scheduler.warmup_steps=2",
        "optimizer.ns_dtype=fp32",
        # as tests/test_mesh.py: rows of tokens absent from a batch get ~1e-9 gradients that differ
        # with summation order, which Adam's default eps would blow up into full steps of either
        # sign (embedding and head are on AdamW); at this preset's AdamW lr (2e-2) eps 1e-5 still
        # left 3-5 of the embedding's 262,144 weights ~4e-6 apart under tp and ep, so 1e-4
        "optimizer.adamw_eps=1e-4"]
LAYOUTS = {"fsdp": "@mesh(dp_shard=2)", "tp": "@mesh(tp=2)", "ep": "@mesh(dp_shard=2,ep=2)"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference, and every layout on 2 processes (one launch, jobs in turn)."""
    tmp = tmp_path_factory.mktemp("muon_sharded")
    config, _ = resolve(deepseek_pretrain.recipe, [*ARGS, "checkpoint=None"])
    one = launch(config)
    out = {"one": (one.losses, {k: v.detach().clone() for k, v in one.model.state_dict().items()})}
    jobs = [{"label": label, "recipe": "deepseek", "folder": None, "weights": str(tmp / f"{label}.safetensors"),
             "args": [*ARGS, f"parallel={plan}"]} for label, plan in LAYOUTS.items()]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    done = run_ranks(worker("mesh"), str(tmp / "jobs.json"), processes=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for job in jobs:
        losses = json.loads(Path(job["weights"] + ".result.json").read_text())["losses"]
        out[job["label"]] = (losses, merged_weights(Path(job["weights"]), 2))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_muon_trains_the_flagship_under_each_layout_as_one_process(runs, layout):
    losses, weights = runs[layout]
    expected_losses, expected = runs["one"]
    assert expected_losses[-1] < expected_losses[0]
    assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-5), layout
    assert set(weights) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6, msg=f"{layout}: {name}")


def test_zero1_refuses_muon_with_a_message_naming_the_fix():
    """ZeRO-1 rebuilds the optimizer per partition from its class and `defaults`; MuonWithAdamW
    keeps its settings in its sub-optimizers (rebuilt, it lost them and torch asserted on the
    group count): refused, naming FSDP as the layout that shards Muon's state."""
    from tessera.components.optim.muon import MuonWithAdamW
    from tessera.components.parallel.zero import shard_optimizer_state

    weight = torch.nn.Parameter(torch.randn(4, 4))
    muon = MuonWithAdamW([{"params": [weight], "kind": "matrix"}], lr=1e-3)
    with pytest.raises(ValueError, match=r"zero1: the optimizer MuonWithAdamW .* use dp_shard"):
        shard_optimizer_state(muon, process_group=None)
