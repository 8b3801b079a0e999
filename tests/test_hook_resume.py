"""Exact resume of the data-parallel plans that keep state of their own: PowerSGD (error
feedback, low-rank bases, its seed generator), 1-bit compression (error feedback) and DiLoCo
(the anchor weights and the outer momentum). Each runs 6 steps straight and, separately, with
one of its two processes SIGKILLed after the step-3 checkpoint, restarted by `torchrun
--max-restarts` and resumed (`--resume auto`) from that checkpoint (gloo); the two step-6
checkpoints (weights, optimizer state, the plan's own state, the loss history) must be equal
bit for bit.
The checkpoint at step 3 falls after the compressors switched on (from step 3) and between
DiLoCo syncs (every 2 steps, with momentum from the first), so state lost on resume shows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tessera.components.parallel import rank_state

from helpers.launch import torchrun, worker

PLANS = {
    "powersgd": "parallel=@mesh(dp_replicate=2) parallel.comm_hook=@powersgd parallel.comm_hook.rank=2 "
                "parallel.comm_hook.start_iter=2",
    "one_bit": "parallel=@mesh(dp_replicate=2) parallel.comm_hook=@one_bit parallel.comm_hook.warmup_steps=2",
    "diloco": "parallel=@mesh(dp_replicate=2) parallel.periodic_sync=@diloco parallel.periodic_sync.inner_steps=2",
}


def tensors(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):  # per-process state is stored in rows, one file each
        for name, value in load_file(file).items():
            out[name] = torch.cat([out[name], value]) if name in out else value
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hook_resume")
    done = torchrun(worker("hook_resume"), str(folder), json.dumps(PLANS), timeout=900,
                    options=["--max-restarts", str(len(PLANS))])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return folder, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLANS))
def test_sigkilled_and_resumed_run_equals_the_straight_run_bitwise(runs, name):
    folder, log = runs
    assert f"hook_resume: rank 1 dies after checkpoint 3 of {name}" in log, log[-3000:]
    # resumed, not started afresh: a fresh start would have moved the step-3 checkpoint aside
    assert (folder / name / "cut" / "step-00000003").is_dir()
    assert not list((folder / name / "cut").glob("previous*")), list((folder / name / "cut").iterdir())
    full = tensors(folder / name / "full" / "step-00000006")
    cut = tensors(folder / name / "cut" / "step-00000006")
    assert set(full) == set(cut)
    plan_state = [k for k in full if k.startswith("extra.parallel.")]
    assert plan_state, "the plan's state is not in the checkpoint"
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    state, straight = (json.loads((folder / name / run / "step-00000006" / "state.json").read_text())
                       for run in ("cut", "full"))
    assert state["extra"]["parallel"], state["extra"].keys()
    assert state["extra"]["history"]["lm"] == straight["extra"]["history"]["lm"]
    assert len(straight["extra"]["history"]["lm"]) == 6


def test_rows_of_another_process_count_are_refused():
    stacked = {"error": torch.zeros(3, 4)}  # written by 3 processes; this one is alone
    with pytest.raises(rank_state.RankStateError, match="written by 3 processes and this run has 1"):
        rank_state.own_rows(stacked, None, what="parallel.comm_hook state")
    assert torch.equal(rank_state.own_rows(rank_state.stack_over_ranks(stacked, None), None, what="x")["error"],
                       stacked["error"])
