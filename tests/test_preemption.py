"""SIGTERM mid-run (what clusters send before they kill a job): every process finishes its
step, the run writes a checkpoint, says where and exits 143; `--resume` then ends exactly
where an uninterrupted run ends. Checked from the command line, in one process and in two."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tessera.components.train.checkpoint import load_model

from helpers.launch import recipe_script, run_program, start

STEPS = 16
ARGS = ["debug", f"steps={STEPS}", "batch_size=4", "seq_len=32", "precision=@fp32", "progress.log_every=1",
        "scheduler.warmup_steps=2", f"scheduler.total_steps={STEPS}", "checkpoint.every=1000",
        "metrics.eval_every=1000", "metrics.plots=False", "metrics.tensorboard=False",
        "model.layers[*].attention.dropout=0.0", "optimizer.eps=1e-5"]
ENV = {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def overrides(folder: Path, processes: int, *extra: str) -> list[str]:
    outputs = [f"checkpoint.folder={folder}/checkpoints", f"metrics.folder={folder}"]
    plan = ["parallel=@fsdp"] if processes > 1 else []
    return [*ARGS, *outputs, *plan, *extra]


def run(folder: Path, processes: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """The llama recipe from the command line, on 1 process or under torchrun."""
    return run_program(recipe_script("llama_pretrain"), *overrides(folder, processes, *extra), processes=processes,
                       env=ENV, timeout=300)


def terminated_at(folder: Path, processes: int, after_step: int) -> tuple[int, str]:
    """Start the run, send SIGTERM (to torchrun itself under 2 processes) once step
    `after_step` is printed; returns the exit status and everything the run printed."""
    proc = start(recipe_script("llama_pretrain"), *overrides(folder, processes), processes=processes, env=ENV,
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    printed = []
    for line in proc.stdout:
        printed.append(line)
        match = re.match(r"step\s+(\d+)\s", line)
        if match and int(match.group(1)) >= after_step:
            proc.send_signal(signal.SIGTERM)
            break
    printed.extend(proc.stdout)
    return proc.wait(timeout=120), "".join(printed)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_model(checkpoint).state_dict()


def stopped_by_sigterm(folder: Path, processes: int) -> tuple[int, int, Path]:
    """SIGTERM the run after step 8 is printed: its exit status, the step it stopped after and
    the checkpoint it says it wrote (checked complete)."""
    status, printed = terminated_at(folder, processes, after_step=8)
    stopped = re.search(rf"stopped by SIGTERM after step (\d+) of {STEPS}; checkpoint written to (\S+); continue "
                        r"with --resume", printed)
    assert stopped, printed[-3000:]
    step, saved = int(stopped.group(1)), Path(stopped.group(2))
    assert 8 <= step < STEPS and saved.name == f"step-{step:08d}" and (saved / "COMPLETE").exists()
    return status, step, saved


@pytest.mark.slow
def test_sigterm_in_one_process_checkpoints_and_exits_143(tmp_path):
    status, _, _ = stopped_by_sigterm(tmp_path, 1)
    assert status == 128 + signal.SIGTERM  # resuming is the same code at every process count: below


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    processes = 2
    status, step, saved = stopped_by_sigterm(tmp_path / "cut", processes)
    assert status != 0  # torchrun reports its workers' failure in its own way

    resumed = run(tmp_path / "cut", processes, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from {saved} (step {step}," in resumed.stdout
    whole = run(tmp_path / "whole", processes)
    assert whole.returncode == 0, whole.stderr[-2000:]

    def final_line(out: str) -> str:
        return re.search(r"done: loss \S+ -> (\S+) \(val (\S+)\)", out).groups()

    assert final_line(resumed.stdout) == final_line(whole.stdout)
    end = f"step-{STEPS:08d}"
    cut, reference = weights(tmp_path / "cut" / "checkpoints" / end), weights(tmp_path / "whole" / "checkpoints" / end)
    assert cut.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(cut[name], reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("after", [[], ["steps=30"]], ids=["bare", "then-an-override"])
def test_resume_with_nothing_to_resume_from_says_so(tmp_path, after):
    # `--resume steps=30` reads as --resume plus an override, not as a checkpoint named "steps=30"
    result = run(tmp_path, 1, "--resume", *after)
    assert result.returncode == 2
    assert f"there is no complete checkpoint in {tmp_path}/checkpoints to resume from" in result.stderr, result.stderr
    assert "run without --resume to start fresh" in result.stderr


def test_a_signal_between_steps_stops_after_the_step_in_process(tmp_path):
    """In process: the run stops after the step during which the signal came, with the
    checkpoint of exactly that step, and no traceback of its own making."""
    import fiddle as fdl

    from tessera.cli import resolve
    from tessera.components.train.checkpoint import Checkpointer
    from tessera.components.train.launch import launch
    from tessera.components.train.preemption import RunInterrupted
    from tessera.recipes.llama_pretrain import recipe

    from helpers.signals import SignalAt

    config, _ = resolve(recipe, [*ARGS[:1], "steps=6", "batch_size=2", "seq_len=32", "progress=None",
                                 "compute.threads=1", "metrics=None"])
    config.checkpoint = fdl.Config(Checkpointer, folder=str(tmp_path), every=1000)
    config.scheduler = fdl.Config(SignalAt, step=3)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM after step 4 of 6") as stopped:
        launch(config)
    assert stopped.value.signum == signal.SIGTERM
    assert (tmp_path / "step-00000004" / "COMPLETE").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
