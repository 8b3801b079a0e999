"""Restart without a human: `--resume auto` under `torchrun --max-restarts` (one worker SIGKILLed
mid-run) ends exactly where an uninterrupted run ends; `true` / `false` / `auto` reach a
`bool | str` field from the command line; a rank that cannot reach the rendezvous says where
it looked and what to check, without a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import fiddle as fdl
import pytest
import torch.distributed as dist

from tessera.components.parallel.process_group import RendezvousError, rendezvous_timeout
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.metrics import Metrics
from tessera.registry.overrides import apply_overrides

from helpers.launch import ROOT, environment, own_traceback_frames, run_recipe, worker

STEPS = 4
ARGS = ["debug", f"steps={STEPS}", "batch_size=2", "seq_len=32", "compute.threads=1", "progress.log_every=1",
        "metrics.eval_every=1000", "metrics.plots=False", "metrics.tensorboard=False", "checkpoint.every=1",
        "checkpoint.keep=10", "parallel=@mesh(dp_replicate=2)"]


def test_bool_or_str_field_takes_true_false_as_keywords_and_anything_else_as_a_path():
    def resume(value: str) -> object:
        config = fdl.Config(Checkpointer, folder="runs/x")  # `resume: bool | str`
        apply_overrides(config, [f"resume={value}"])
        return config.resume

    assert resume("true") is True and resume("TRUE") is True
    assert resume("false") is False and resume("False") is False
    assert resume("auto") == "auto"
    assert resume("runs/x/step-00000004") == "runs/x/step-00000004"
    assert resume("./true") == "./true"  # how a checkpoint folder named "true" is still reached
    checkpoint = fdl.Config(Checkpointer, folder="runs/x")
    apply_overrides(checkpoint, ["folder=true"])  # a plain `str` field keeps the word
    assert checkpoint.folder == "true"
    metrics = fdl.Config(Metrics, folder="runs/x")
    apply_overrides(metrics, ["plots=false"])  # a plain `bool` field takes it too
    assert metrics.plots is False


def test_rendezvous_timeout_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("TESSERA_RENDEZVOUS_TIMEOUT", "2.5")
    assert rendezvous_timeout().total_seconds() == 2.5
    monkeypatch.setenv("TESSERA_RENDEZVOUS_TIMEOUT", "soon")
    with pytest.raises(RendezvousError, match="TESSERA_RENDEZVOUS_TIMEOUT='soon' is not a positive number"):
        rendezvous_timeout()


def _closed_port() -> int:
    with socket.socket() as s:  # bound and released: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_that_cannot_reach_the_rendezvous_says_where_and_what_to_check():
    port = _closed_port()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TESSERA_RENDEZVOUS_TIMEOUT": "2"}
    result = run_recipe("debug", "steps=1", "batch_size=2", "seq_len=32", "compute.threads=1",
                        "parallel=@mesh(dp_replicate=2)", "checkpoint=None", "metrics=None", env=env, timeout=180)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert f"rendezvous error: rank 1 of 2 could not join the process group at 127.0.0.1:{port} within 2 s" in message
    assert "MASTER_ADDR:MASTER_PORT" in message and "TESSERA_RENDEZVOUS_TIMEOUT" in message
    assert "Traceback" not in result.stderr and not own_traceback_frames(result.stderr)


def _attempt(restart: int, *, port: int, nodes: int, rank_zero_delay: float) -> list[subprocess.Popen[str]]:
    """Both ranks of launcher attempt `restart` against torchrun's shared store at `port`; rank 1
    starts first, as a restarted rank that loads faster than rank 0 does."""
    def rank(r: int) -> subprocess.Popen[str]:
        env = {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": str(nodes),
               "TORCHELASTIC_RESTART_COUNT": str(restart), "TESSERA_RENDEZVOUS_TIMEOUT": "60",
               "DIE": "1" if restart == 0 else "0"}  # the first attempt dies, leaving its keys
        return subprocess.Popen([sys.executable, str(worker("join_attempt"))], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(env))

    first = rank(1)
    time.sleep(rank_zero_delay)
    return [rank(0), first]


@pytest.mark.slow
def test_a_restarted_attempt_does_not_read_the_dead_attempts_addresses():
    # torchrun hosts one store for its workers and keeps it across restarts (as here: this process
    # holds it); attempt 0's keys are still in it when attempt 1's rank 1 looks for rank 0
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False)
    for restart, delay in ((0, 0.0), (1, 4.0)):
        ranks = _attempt(restart, port=store.port, nodes=1, rank_zero_delay=delay)
        outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
        for proc, output in zip(ranks, outputs, strict=True):
            assert proc.returncode == 0 and "joined: sum 2" in output, f"attempt {restart}: {output[-2000:]}"


def _torchrun(folder: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The killable recipe (tests/helpers/workers/killed_once.py) on 2 processes under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *options,
               str(worker("killed_once")), *ARGS, f"checkpoint.folder={folder}/checkpoints",
               f"metrics.folder={folder}", "--resume", "auto"]
    return subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=environment({"COLUMNS": "200", "PYTHONUNBUFFERED": "1", **(env or {})}))


def _losses(folder: Path) -> list[float]:
    """Every step's loss, as the final checkpoint holds them (JSON floats: exact)."""
    state = json.loads((folder / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    return state["extra"]["history"]["lm"]


@pytest.mark.slow
def test_sigkilled_worker_restarts_from_the_newest_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
    whole = _torchrun(tmp_path / "whole", env={"KILL_RANK": "-1", "KILL_STEP": "0"})  # both at once: 2 cores
    killed = _torchrun(tmp_path / "killed", "--max-restarts", "3", env={"KILL_RANK": "1", "KILL_STEP": "2"})
    killed_log, _ = killed.communicate(timeout=600)
    whole_log, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, whole_log[-3000:]
    assert killed.returncode == 0, killed_log[-3000:]
    assert "killed_once: rank 1 dies after checkpoint 2" in killed_log
    folder = tmp_path / "killed" / "checkpoints"
    fresh = f"resume auto: no checkpoint in {folder} yet, starting fresh"
    resumed = f"resume auto: resuming from {folder}/step-00000002 (step 2,"
    assert killed_log.count(fresh) == 1 and killed_log.count(resumed) == 1, killed_log[-3000:]
    assert killed_log.index(fresh) < killed_log.index("step     1") < killed_log.index(resumed)
    # the first restart joins at once: no rank reads the dead attempt's gloo address
    assert "connectFullMesh" not in killed_log and "timed out connecting" not in killed_log, killed_log[-3000:]
    assert not (folder / "previous").exists() and not list(folder.glob("previous-*"))
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
    assert len(_losses(tmp_path / "whole")) == STEPS
