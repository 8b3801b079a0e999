"""Checkpoints: exact resume after SIGKILL, crash-safe writes, truncated files, accumulation."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import fiddle as fdl
import pytest
import torch
from safetensors.torch import load_file

from tessera.cli import resolve
from tessera.components.train.checkpoint import Checkpointer, ResumeError, load_model
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe

from helpers.launch import run_recipe, worker
from helpers.launch import start as launch_process


def start(folder) -> subprocess.Popen:
    """12 steps checkpointed every step into `folder` (tests/helpers/workers/checkpoint_every_step.py)."""
    return launch_process(worker("checkpoint_every_step"), str(folder), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def final_state(folder):
    path = folder / "step-00000012"
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors, json.loads((path / "state.json").read_text())


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    full = start(tmp_path / "full")
    out, err = full.communicate(timeout=300)
    assert "FINISHED" in out, err
    interrupted = start(tmp_path / "cut")
    deadline = time.time() + 240
    while not (tmp_path / "cut" / "step-00000004" / "COMPLETE").exists():
        assert time.time() < deadline and interrupted.poll() is None, interrupted.stderr.read()
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "cut" / "step-00000012").exists(), "the run finished before it could be killed"
    resumed = start(tmp_path / "cut")
    out, err = resumed.communicate(timeout=300)
    assert "FINISHED" in out, err
    a, state_a = final_state(tmp_path / "full")
    b, state_b = final_state(tmp_path / "cut")
    assert set(a) == set(b) and any(k.startswith("optim.") for k in a)
    for name in a:  # weights, optimizer moments, RNG and loader generator states
        assert torch.equal(a[name], b[name]), name
    assert state_a["extra"]["history"] == state_b["extra"]["history"]  # the loss sequence
    assert state_a["extra"]["data"] == state_b["extra"]["data"]        # loader cursors


def small_run(tmp_path, *extra: str, **checkpoint):
    config, _ = resolve(recipe, ["debug", "steps=3", "batch_size=2", "seq_len=32", "precision=@fp32",
                                 "progress=None", "compute.threads=1", *extra])
    config.checkpoint = fdl.Config(Checkpointer, folder=str(tmp_path / "ck"), **{"every": 1, "keep": 2, **checkpoint})
    return launch(config)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """`small_run`'s plain 3-step run (keep 2), made once: (its folder, its result). Tests that
    change its checkpoints work on a copy (`copy_of`)."""
    folder = tmp_path_factory.mktemp("three_steps")
    return folder, small_run(folder)


def copy_of(three_steps, tmp_path):
    """A copy of the 3-step run's checkpoint folder in `tmp_path` (as `small_run(tmp_path)` leaves it)."""
    shutil.copytree(three_steps[0] / "ck", tmp_path / "ck")


def test_keep_last_k_and_crash_during_write_leaves_previous(three_steps, tmp_path, monkeypatch):
    copy_of(three_steps, tmp_path)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    import tessera.components.train.checkpoint as ck

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        small_run(tmp_path, "steps=4", resume=True)
    monkeypatch.undo()
    assert Checkpointer(folder=str(tmp_path / "ck")).latest().name == "step-00000003"
    result = small_run(tmp_path, "steps=4", resume=True)  # the leftover temp folder does not matter
    assert len(result.losses) == 4


def test_truncated_checkpoint_is_a_clear_error_and_resume_falls_back(three_steps, tmp_path, capsys):
    copy_of(three_steps, tmp_path)
    newest = tmp_path / "ck" / "step-00000003"
    (newest / "state.json").write_text('{"step": 3, "optim')  # truncated JSON
    checkpointer = Checkpointer(folder=str(tmp_path / "ck"), resume=True)
    capsys.readouterr()
    assert checkpointer.latest().name == "step-00000002"
    damaged = f"checkpoint step-00000003 is damaged: {newest / 'state.json'}: 18 bytes, expected"
    assert damaged in capsys.readouterr().err
    shard = next((tmp_path / "ck" / "step-00000002").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:200])  # truncated tensors
    model = fdl.build(recipe.config("debug").model)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(RuntimeError, match="cannot be loaded.*truncated"):
        checkpointer.load(tmp_path / "ck" / "step-00000002", model=model, optimizer=optimizer)
    with pytest.raises(ResumeError, match="incomplete"):
        Checkpointer(folder=str(tmp_path / "ck"), resume=str(tmp_path / "ck" / "nope")).resume_path()


def test_gradient_accumulation_equals_one_large_batch():
    from helpers.stdlib_bytes import StdlibBytes

    results = []
    for micro in (2, 8):
        config, _ = resolve(recipe, ["debug", "steps=2", "batch_size=8", f"step.micro_batch_size={micro}", "seq_len=32",
                                     "precision=@fp32", "progress=None", "compute.threads=1"])
        config.data = fdl.Config(StdlibBytes, max_bytes=400_000)  # generator-driven: same sequences either way
        config.model.vocab_size = 2048
        results.append(launch(config))
    a, b = (dict(r.model.named_parameters()) for r in results)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)  # summation order differs
    assert results[0].losses == pytest.approx(results[1].losses, rel=1e-5)


def test_async_save_writes_the_same_checkpoint_and_resumes(three_steps, tmp_path):
    copy_of(three_steps, tmp_path / "sync")
    sync = three_steps[1]
    asynchronous = small_run(tmp_path / "async", async_save=True)
    a = {}
    b = {}
    for target, root in ((a, tmp_path / "sync"), (b, tmp_path / "async")):
        for file in (root / "ck" / "step-00000003").glob("*.safetensors"):
            target.update(load_file(file))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    resumed = small_run(tmp_path / "async", "steps=5", resume=True, async_save=True)
    assert resumed.losses[:3] == asynchronous.losses == sync.losses and len(resumed.losses) == 5


@pytest.mark.slow
def test_recipe_writes_checkpoints_by_default_and_resume_flag_continues(tmp_path):
    args = ["steps=4", "batch_size=2", "seq_len=32", "compute.threads=1", "scheduler.warmup_steps=1",
            "scheduler.total_steps=6", f"metrics.folder={tmp_path}", f"checkpoint.folder={tmp_path}/ck",
            "checkpoint.every=2", "metrics.plots=False"]
    first = run_recipe(*args)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000002", "step-00000004"]
    resumed = run_recipe(*args[1:], "steps=6", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path}/ck/step-00000004 (step 4" in resumed.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "mfu" in r] == [1, 2, 3, 4, 5, 6]  # the log continues, not restarts


def test_checkpoint_carries_the_config_that_wrote_it(tmp_path):
    from tessera.registry import serialize

    config, _ = resolve(recipe, ["debug", "steps=2", "batch_size=2", "seq_len=32", "precision=@fp32",
                                 "progress=None", "compute.threads=1", "optimizer.lr=1e-3"])
    config.checkpoint = fdl.Config(Checkpointer, folder=str(tmp_path / "ck"), every=1, keep=2)
    launch(config)
    for step in (1, 2):
        assert serialize.load(tmp_path / "ck" / f"step-{step:08d}" / "config.json") == config


def test_fresh_run_sets_the_earlier_runs_checkpoints_aside(tmp_path):
    small_run(tmp_path, "steps=3", keep=5)                 # an earlier, longer run: steps 1-3
    result = small_run(tmp_path, "steps=2", keep=5)        # a fresh one in the same folder
    folder = tmp_path / "ck"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000001", "step-00000002"]
    (previous,) = folder.glob("previous-*")
    assert sorted(p.name for p in previous.iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]
    assert Checkpointer(folder=str(folder)).latest().name == "step-00000002" and len(result.losses) == 2


def test_a_tied_head_saves_once_and_resumes_tied_and_exactly(tmp_path):
    """safetensors refuses two names for one storage: the head is written as the embedding's
    alias, and after loading it is the embedding's very tensor again."""
    whole = small_run(tmp_path / "whole", "steps=4", "model.tie_embeddings=True")
    small_run(tmp_path / "split", "steps=2", "model.tie_embeddings=True")
    resumed = small_run(tmp_path / "split", "steps=4", "model.tie_embeddings=True", resume=True)
    assert resumed.losses[-2:] == whole.losses[-2:]
    assert resumed.model.head.weight is resumed.model.embedding.weight
    loaded = load_model(tmp_path / "split" / "ck" / "step-00000004")
    assert loaded.head.weight is loaded.embedding.weight
    assert torch.equal(loaded.embedding.weight, whole.model.embedding.weight.detach())


def test_keep_zero_is_a_config_fault_naming_the_path():
    from tessera.registry.errors import ConfigError

    with pytest.raises(ConfigError, match="keep"):
        resolve(recipe, ["debug", "checkpoint.keep=0"])
