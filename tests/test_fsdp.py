"""Data parallelism with FSDP2 on 2 CPU processes (gloo): the same run as one process, and
sharded checkpoints that reshard between 2 processes and 1."""

from __future__ import annotations

import json
import shutil

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe

from helpers.forked_ranks import run_ranks
from helpers.launch import worker

ARGS = ["debug", "batch_size=8", "seq_len=64", "precision=@fp32", "compute.threads=1", "progress=None",
        "scheduler.total_steps=6", "scheduler.warmup_steps=2", "model.layers[*].attention.dropout=0.0",
        # Rows of tokens absent from a batch get gradients of ~1e-9 that differ with summation
        # order; Adam's default eps (1e-8) would blow those up to full-size steps of either sign.
        "optimizer.eps=1e-5"]


def two_process_jobs(*jobs: dict) -> dict[str, list[float]]:
    """Train each job ({label, steps, folder, extra, async_save}) on 2 processes, one after
    another in one launch (tests/helpers/workers/fsdp.py; validating every 2 steps,
    which every rank must join); returns each label's per-step losses rank 0 reports."""
    spec = [{"label": job["label"], "steps": job["steps"], "folder": str(job["folder"]),
             "async_save": job.get("async_save", False),
             "overrides": [*ARGS, f"metrics.folder={job['folder']}/metrics", "metrics.eval_every=2",
                           "metrics.plots=False", "metrics.tensorboard=False", *job.get("extra", ())]}
            for job in jobs]
    done = run_ranks(worker("fsdp"), json.dumps(spec), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = {}
    for line in done.stdout.splitlines():
        if line.startswith("LOSSES "):
            label, values = line[len("LOSSES "):].split(" ", 1)
            losses[label] = json.loads(values)
    assert set(losses) == {job["label"] for job in jobs}, done.stdout[-2000:]
    return losses


def two_processes(steps: int, folder, *extra: str, async_save: bool = False) -> list[float]:
    """One run on 2 processes (see `two_process_jobs`): its per-step losses."""
    return two_process_jobs(dict(label="run", steps=steps, folder=folder, extra=extra, async_save=async_save))["run"]


# bf16 is slow on AVX2-only CPUs: the bf16_params runs are small
BF16_SMALL = ("precision=@bf16_params", "batch_size=4", "seq_len=32", "validation.batches=2")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """The 2-process runs that need nothing from another run, in one launch (each process pays
    the imports once): fp32 steps 1-4 into `two`, and bf16_params steps 1-4 into `bf16`."""
    folder = tmp_path_factory.mktemp("fsdp")
    losses = two_process_jobs(dict(label="two", steps=4, folder=folder / "two"),
                              dict(label="bf16", steps=4, folder=folder / "bf16", extra=BF16_SMALL))
    return folder, losses


def one_process(steps: int, folder, *extra: str):
    config, _ = resolve(recipe, [*ARGS, *extra, f"steps={steps}"])
    config.checkpoint = fdl.Config(Checkpointer, folder=str(folder), every=2, keep=5, resume=True)
    return launch(config)


def weights(folder, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's model and optimizer tensors, loaded into a single-process model."""
    config, _ = resolve(recipe, ARGS)
    model = fdl.build(config.model)
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(folder=str(folder)).load(folder / f"step-{step:08d}", model=model, optimizer=optimizer)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, param in enumerate(model.parameters()):
        state.update({f"optim.{i}.{k}": v for k, v in optimizer.state[param].items()})
    return state


@pytest.mark.slow
def test_two_processes_train_and_reshard_checkpoints_like_one(sharded_runs, tmp_path):
    folder, losses = sharded_runs
    sharded = losses["two"]                                        # 2 processes, steps 1-4, sharded saves
    shutil.copytree(folder / "two", tmp_path / "two")
    assert len(list((tmp_path / "two" / "step-00000004").glob("shard-*.safetensors"))) == 2
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    reference = one_process(6, tmp_path / "one")                   # 1 process, steps 1-6
    assert sharded == pytest.approx(reference.losses[:4], rel=1e-5, abs=1e-5)

    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")  # 2 -> 1 process: resume on one
    resumed_on_one = one_process(6, tmp_path / "two_then_one")
    assert resumed_on_one.losses == pytest.approx(reference.losses, rel=1e-5, abs=1e-5)

    shutil.copytree(tmp_path / "one", tmp_path / "one_then_two")  # 1 -> 2 processes: resume on two
    shutil.rmtree(tmp_path / "one_then_two" / "step-00000006")
    resumed_on_two = two_processes(6, tmp_path / "one_then_two", async_save=True)  # background sharded saves
    assert resumed_on_two == pytest.approx(reference.losses, rel=1e-5, abs=1e-5)

    expected = weights(tmp_path / "one", 6)
    for other in ("two_then_one", "one_then_two"):
        got = weights(tmp_path / other, 6)
        assert set(got) == set(expected)
        for name, value in expected.items():
            # atol 1e-5 (5e-4 of the init std): the odd weight whose gradient sits near Adam's eps
            # moves by up to ~2e-6 with the summation order (1 of 393,216 in the embedding); a
            # shard loaded into the wrong place would be off by the weights' own size, ~1e-2
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda detail, other=other, name=name: f"{other}: {name}: {detail}")


@pytest.mark.slow
def test_bf16_params_under_fsdp_keeps_fp32_sharded_masters(sharded_runs, tmp_path):
    folder, losses = sharded_runs
    sharded = losses["bf16"]
    single = one_process(4, tmp_path / "one", *BF16_SMALL).losses
    assert sharded[0] == pytest.approx(single[0], rel=1e-2)  # bf16 compute either way; masters start
    assert sharded == pytest.approx(single, rel=3e-2)          # rounded on one process, exact on two
    from safetensors.torch import load_file

    stored = {}
    for file in (folder / "bf16" / "step-00000004").glob("*.safetensors"):
        stored.update(load_file(file))
    assert {v.dtype for k, v in stored.items() if k.startswith("model.")} == {torch.float32}


def test_random_window_data_gives_each_rank_its_share():
    from tessera.components.interfaces import DataShare

    import helpers.stdlib_bytes as stdlib_bytes

    data = stdlib_bytes.StdlibBytes(max_bytes=200_000)
    whole = data.batch("train", batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(3))["tokens"]
    shares = []
    for rank in range(2):
        data.read_share(DataShare(rank, 2))
        shares.append(data.batch("train", batch_size=2, seq_len=16,
                                 generator=torch.Generator().manual_seed(3))["tokens"])
    assert torch.equal(shares[0], whole[0::2]) and torch.equal(shares[1], whole[1::2])



def test_bf16_params_masters_become_the_sharded_weights_on_resume(tmp_path, monkeypatch):
    import socket

    from safetensors.torch import load_file

    small = ("batch_size=4", "seq_len=32", "validation.batches=2")  # bf16 is slow on AVX2-only CPUs
    one_process(2, tmp_path / "ck", "precision=@bf16_params", *small)  # bf16 weights and fp32 masters saved
    stored = load_file(next((tmp_path / "ck" / "step-00000002").glob("*.safetensors")))
    with socket.socket() as s:  # a group of one in this process, its environment undone afterwards
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    resumed = one_process(2, tmp_path / "ck", "precision=@bf16_params", "parallel=@fsdp", *small)  # nothing to train
    for name, param in resumed.model.named_parameters():
        local = param.to_local()
        assert local.dtype == torch.float32
        assert torch.equal(local, stored[f"optim.state.{name}.master"]), name  # not the rounded bf16 weights
