"""Checkpoint integrity: damaged files are found before resuming (one process and two), and
resuming with another model names the config paths that differ instead of failing in DCP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fiddle as fdl
import pytest
import torch
from safetensors.torch import load_file

from tessera.cli import resolve
from tessera.components.train import resume_config
from tessera.components.train.checkpoint import Checkpointer, ResumeError, ResumeMismatch
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe

from helpers.checkpoint_damage import damage
from helpers.launch import run_recipe, torchrun, worker

ARGS = ["debug", "batch_size=2", "seq_len=32", "precision=@fp32", "progress=None", "compute.threads=1",
        "scheduler.warmup_steps=1", "scheduler.total_steps=3"]


def run(folder: Path, *extra: str, steps: int = 3, resume: bool | str = True):
    config, _ = resolve(recipe, [*ARGS, f"steps={steps}", *extra])
    config.checkpoint = fdl.Config(Checkpointer, folder=str(folder), every=1, keep=5, resume=resume)
    return launch(config)


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An uninterrupted 3-step run checkpointed every step, and its step-3 tensors."""
    folder = tmp_path_factory.mktemp("pristine") / "ck"
    result = run(folder, resume=False)
    return folder, result.losses, tensors(folder / "step-00000003")


CASES = ["header", "middle", "last byte", "truncated", "missing shard", "missing manifest"]


@pytest.mark.parametrize("case", CASES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(pristine, tmp_path, capsys, case):
    source, losses, final = pristine
    folder = tmp_path / "ck"
    shutil.copytree(source, folder)
    file, what = damage(folder / "step-00000003", case)
    before = (folder / "step-00000002" / "state.json").stat().st_mtime_ns
    capsys.readouterr()
    assert Checkpointer(folder=str(folder), resume=True).resume_path() == folder / "step-00000002"
    warning = capsys.readouterr().err
    assert f"checkpoint step-00000003 is damaged: {file}: {what}" in warning, warning
    assert "resuming from step-00000002 instead" in warning
    resumed = run(folder)  # trains step 3 again from step 2's checkpoint
    assert resumed.losses == losses  # history from the checkpoint, then the retrained step: exact
    _equal(tensors(folder / "step-00000003"), final)
    # It resumed from step 2 (left untouched) rather than starting fresh (which sets earlier checkpoints aside).
    assert (folder / "step-00000002" / "state.json").stat().st_mtime_ns == before
    assert not list(folder.glob("previous-*"))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # weights, optimizer moments, RNG and loader states
    return True


def test_a_damaged_checkpoint_named_explicitly_is_an_error_not_a_fallback(pristine, tmp_path):
    source, _, _ = pristine
    folder = tmp_path / "ck"
    shutil.copytree(source, folder)
    file, what = damage(folder / "step-00000003", "truncated")
    with pytest.raises(ResumeError) as raised:
        Checkpointer(folder=str(folder), resume=str(folder / "step-00000003")).resume_path()
    message = str(raised.value)
    assert f"checkpoint {folder / 'step-00000003'} is damaged: {file}: {what}" in message
    assert "--resume without a path takes the newest intact checkpoint" in message
    with pytest.raises(ResumeError, match="missing or incomplete"):
        Checkpointer(folder=str(folder), resume=str(folder / "step-00000009")).resume_path()


def test_every_checkpoint_damaged_resumes_nothing_and_says_so(pristine, tmp_path, capsys):
    source, _, _ = pristine
    folder = tmp_path / "ck"
    shutil.copytree(source, folder)
    for step in (1, 2, 3):
        damage(folder / f"step-{step:08d}", "truncated")
    capsys.readouterr()
    assert Checkpointer(folder=str(folder), resume=True).resume_path() is None
    err = capsys.readouterr().err
    assert err.count("is damaged") == 3 and "no intact checkpoint is left" in err


def test_a_checkpoint_from_before_manifests_loads_unverified(pristine, tmp_path, capsys):
    source, losses, final = pristine
    folder = tmp_path / "ck"
    shutil.copytree(source, folder)
    (folder / "step-00000003" / "MANIFEST.json").unlink()
    (folder / "step-00000003" / "COMPLETE").write_text("ok\n")  # as checkpoints were written before manifests
    capsys.readouterr()
    resumed = run(folder)  # nothing left to train: loads step 3 and ends
    assert f"checkpoint {folder / 'step-00000003'} has no MANIFEST.json" in capsys.readouterr().err
    assert resumed.losses == losses
    model_state = {f"model.{k}": v for k, v in resumed.model.state_dict().items()}
    stored = {k.partition(":")[2]: v for k, v in final.items()}
    assert all(torch.equal(v, stored[k]) for k, v in model_state.items())


def test_verifying_a_debug_checkpoint_is_fast(pristine):
    import time

    from tessera.components.train import manifest

    source, _, _ = pristine
    checkpoint = source / "step-00000003"
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    start = time.perf_counter()
    verdict = manifest.verify(checkpoint)
    elapsed = time.perf_counter() - start
    assert verdict.verified and verdict.intact
    assert elapsed < 1.0, f"verifying {size:,} bytes took {elapsed:.2f} s"  # ~40 MB: tens of ms on one core


# -- resuming with another config ------------------------------------------------------------------

def config_of(*overrides: str):
    config, _ = resolve(recipe, [*ARGS, *overrides], check=False)
    return config


def diff_lines(a, b) -> list[str]:
    saved, current = resume_config.flatten(a), resume_config.flatten(b)
    return resume_config.collapse(resume_config.differences(saved, current), saved, current)


def test_differences_collapse_over_layers_only_when_every_layer_differs_alike():
    base = config_of()
    assert diff_lines(base, config_of("model.layers[*].attention.n_kv_heads=1")) == [
        "model.layers[*].attention.n_kv_heads: 2 -> 1"]
    assert diff_lines(base, config_of("model.layers[1].attention.n_kv_heads=1")) == [
        "model.layers[1].attention.n_kv_heads: 2 -> 1"]
    assert diff_lines(base, config_of("steps=7", "optimizer.lr=0.01")) == [
        "optimizer.lr: 0.003 -> 0.01", "steps: 350 -> 7"]
    # Setting an argument to its default is no difference; a swapped component is one line, not its arguments.
    assert diff_lines(base, config_of("model.layers[*].attention.dropout=0.0")) == []
    swapped = diff_lines(base, config_of("model.layers[*].attention.position=@alibi"))  # RoPE's theta: not listed
    assert swapped == ["model.layers[*].attention.position: RoPE -> ALiBi"], swapped


def test_only_tensor_shapes_and_the_optimizer_block_a_resume(tmp_path):
    base = config_of()
    where = tmp_path / "step-00000002"
    notes = resume_config.check(where, base, config_of("steps=10", "model.layers[*].attention.position.theta=5e5"))
    assert notes == ["model.layers[*].attention.position.theta: 10000.0 -> 500000.0", "steps: 350 -> 10"]
    with pytest.raises(ResumeMismatch) as raised:
        resume_config.check(where, base, config_of("model.layers[*].attention.n_kv_heads=1"))
    message = str(raised.value)
    assert "model.layers[*].attention.n_kv_heads: 2 -> 1" in message
    assert "layers.0.attention.wk.weight: [64, 192] -> [32, 192]" in message  # 2 kv heads of 32 dims -> 1
    assert f"--load {where / 'config.json'} --resume" in message
    with pytest.raises(ResumeMismatch, match="another optimizer keeps other state"):
        resume_config.check(where, base, config_of("optimizer=@muon"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A 2-step run from the command line, checkpointed every step."""
    root = tmp_path_factory.mktemp("cli")
    args = ["debug", "batch_size=2", "seq_len=32", "compute.threads=1", "scheduler.warmup_steps=1",
            "scheduler.total_steps=4",
            f"metrics.folder={root}", "metrics.plots=False", "metrics.tensorboard=False", "metrics.eval_every=100",
            f"checkpoint.folder={root}/ck", "checkpoint.every=1"]
    first = run_recipe(*args, "steps=2")
    assert first.returncode == 0, first.stderr
    return root, args


@pytest.mark.slow
def test_cli_resume_with_another_model_names_the_paths_and_exits_2(cli_run, tmp_path):
    root, args = cli_run
    done = run_recipe(*args, "steps=2", "model.layers[*].attention.n_kv_heads=1", "--resume")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: cannot resume from"), done.stderr
    assert "model.layers[*].attention.n_kv_heads: 2 -> 1" in done.stderr
    assert f"--load {root}/ck/step-00000002/config.json --resume" in done.stderr
    # The advice works: the checkpoint's own config resumes it, with steps raised (in a copy: the
    # module's other test starts from the 2-step folder).
    shutil.copytree(root / "ck", tmp_path / "ck")
    resumed = run_recipe("--load", f"{root}/ck/step-00000002/config.json", "steps=3",
                         f"checkpoint.folder={tmp_path}/ck", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path}/ck/step-00000002 (step 2" in resumed.stdout


@pytest.mark.slow
def test_cli_resume_extending_steps_and_damaged_explicit_path(cli_run, tmp_path):
    root, args = cli_run
    folder = tmp_path / "ck"
    shutil.copytree(root / "ck", folder)
    args = [a for a in args if not a.startswith("checkpoint.folder=")] + [f"checkpoint.folder={folder}"]
    file, what = damage(folder / "step-00000002", "truncated")
    explicit = run_recipe(*args, "steps=3", "--resume", str(folder / "step-00000002"))
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr, explicit.stderr
    assert f"error: checkpoint {folder}/step-00000002 is damaged: {file}: {what}" in explicit.stderr
    extended = run_recipe(*args, "steps=3", "--resume")  # falls back to step 1 and trains to 3
    assert extended.returncode == 0, extended.stderr
    assert f"checkpoint step-00000002 is damaged: {file}: {what}; resuming from step-00000001" in extended.stderr
    assert "steps: 2 -> 3" in extended.stderr  # noted, not blocking
    assert f"resuming from {folder}/step-00000001 (step 1" in extended.stdout
    assert (folder / "step-00000003" / "COMPLETE").exists()


# -- two processes -----------------------------------------------------------------------------------

TWO_CASES = ["header", "truncated", "missing shard", "missing manifest"]


@pytest.mark.slow
def test_two_processes_fall_back_alike_and_resume_like_an_uninterrupted_run(tmp_path):
    logs = tmp_path / "logs"
    done = torchrun(worker("checkpoint_integrity"), str(tmp_path), *TWO_CASES, timeout=300,
                    options=["--log-dir", str(logs), "--redirects", "3"])
    per_rank = {int(p.parent.name): p.parent for p in logs.rglob("stdout.log")}
    stdout = {rank: (folder / "stdout.log").read_text() for rank, folder in per_rank.items()}
    stderr = {rank: (folder / "stderr.log").read_text() for rank, folder in per_rank.items()}
    assert done.returncode == 0, done.stderr[-2000:] + "".join(s[-2000:] for s in stderr.values())
    results = [json.loads(next(line for line in stdout[r].splitlines() if line.startswith("RESULT"))[7:])
               for r in (0, 1)]
    assert results[0] == results[1]  # every rank chose the same checkpoint and saw the same losses
    result = results[0]
    assert len(list((tmp_path / "full" / "step-00000003").glob("*.safetensors"))) == 2  # one shard per rank
    final = tensors(tmp_path / "full" / "step-00000003")
    for case in TWO_CASES:
        assert result[case]["chosen"] == "step-00000002", case
        assert result[case]["losses"] == result["full"], case
        _equal(tensors(tmp_path / case.replace(" ", "_") / "step-00000003"), final)
        assert f"{tmp_path / case.replace(' ', '_')}/step-00000003/" in stderr[0]  # the damaged file, named
    assert stderr[0].count("resuming from step-00000002 instead") == 2 * len(TWO_CASES)  # the test's and the run's
    assert "is damaged" not in stderr[1]  # rank 0 alone speaks
    assert "step-00000003 is damaged" in result["explicit"] and "(truncated)" in result["explicit"]
