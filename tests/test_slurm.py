"""SLURM without a cluster: the node-list syntax and the rendezvous derived from SLURM's
variables (checked against hand-expanded lists from SLURM's documented syntax), and the
recipe's `--slurm` job script, run by bash with fake `srun` / `scontrol` / `sbatch` on PATH
that record what they were asked. (Two processes training together from SLURM_* set by hand
are in tests/test_multinode.py, beside the torchrun runs they must equal.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tessera.cli.run import run_cli
from tessera.components.parallel.slurm_env import SlurmEnvError, expand_hostlist, torch_env_from_slurm
from tessera.recipes.llama_pretrain import recipe

from helpers.launch import own_traceback_frames

TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "912345"}


@pytest.mark.parametrize(("compact", "hosts"), [
    ("tux[0-3]", ["tux0", "tux1", "tux2", "tux3"]),
    ("node[01-03,7],gpu1", ["node01", "node02", "node03", "node7", "gpu1"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("a,b-1,c[9-10]", ["a", "b-1", "c9", "c10"]),
])
def test_expand_hostlist(compact: str, hosts: list[str]) -> None:
    assert expand_hostlist(compact) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node[3-1]", "node[a-b]", ""])
def test_unreadable_hostlist_is_named(bad: str) -> None:
    with pytest.raises(SlurmEnvError, match="node list"):
        expand_hostlist(bad)


def test_rendezvous_from_slurm_variables() -> None:
    env = torch_env_from_slurm(TASK)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}
    # every task of the job derives the same port; another job (almost always) another one
    assert env["MASTER_PORT"] == torch_env_from_slurm({**TASK, "SLURM_PROCID": "0"})["MASTER_PORT"]
    assert env["MASTER_PORT"] != torch_env_from_slurm({**TASK, "SLURM_JOB_ID": "912346"})["MASTER_PORT"]
    assert 1024 < int(env["MASTER_PORT"]) < 65536


def test_torchrun_and_user_settings_win() -> None:
    assert torch_env_from_slurm({**TASK, "RANK": "0"}) == {}  # srun torchrun: torchrun's ranks
    assert torch_env_from_slurm({"PATH": "/bin"}) == {}  # not under SLURM
    assert torch_env_from_slurm({**TASK, "SLURM_NTASKS": "1"}) == {}  # one task: a group of one
    kept = torch_env_from_slurm({**TASK, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"})
    assert (kept["MASTER_ADDR"], kept["MASTER_PORT"]) == ("10.0.0.5", "29400")
    with pytest.raises(SlurmEnvError, match="SLURM_NTASKS or SLURM_JOB_NODELIST"):
        torch_env_from_slurm({"SLURM_PROCID": "0"})


# -- the job script ------------------------------------------------------------------------------

FAKES = {
    # srun: record the command line (after the script's shell expanded it); wait for SIGTERM like a
    # training step when asked to, and say it saved
    "srun": 'printf "%s\\n" "$@" > "$FAKE_LOG/srun.args"\n'
            'echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > "$FAKE_LOG/srun.env"\n'
            'if [ -n "$FAKE_SRUN_WAIT" ]; then trap \'echo saved > "$FAKE_LOG/srun.term"; exit 143\' TERM\n'
            '  touch "$FAKE_LOG/srun.started"; while true; do sleep 0.1; done; fi\n',
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "nodeA\\nnodeB\\n"; '
                'else echo "$@" >> "$FAKE_LOG/scontrol.calls"; fi\n',
    "sbatch": 'printf "%s\\n" "$@" > "$FAKE_LOG/sbatch.args"; echo "4711;cluster"\n',
}
RUN = ["debug", "steps=5", "device=cuda", "metrics.plots=False"]


def fake_path(tmp_path: Path) -> dict[str, str]:
    """Environment with fake SLURM commands first on PATH, each logging under tmp_path/log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}


@pytest.fixture(autouse=True)
def presets_with_run_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presets' checkpoint and metrics folders back (conftest drops them in-process): a job
    script needs both, and each test points them into its tmp_path."""
    import tessera.recipes.llama_pretrain
    from tessera.components.train.outputs import run_outputs

    monkeypatch.setattr(tessera.recipes.llama_pretrain, "run_outputs", run_outputs)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The recipe's command line in this process: (exit status, stdout, stderr)."""
    try:
        run_cli(recipe, list(args))
        status = 0
    except SystemExit as stop:
        status = int(stop.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def write_script(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str) -> Path:
    status, out, err = cli(capsys, *RUN, f"metrics.folder={tmp_path}/run",
                           f"checkpoint.folder={tmp_path}/run/checkpoints", "--slurm", spec, "--slurm-script-only")
    assert status == 0, err
    script = tmp_path / "run" / "slurm.sbatch"
    assert f"wrote {script}" in out
    return script


def directives(script: Path) -> dict[str, str]:
    lines = [line.removeprefix("#SBATCH ").strip() for line in script.read_text().splitlines()
             if line.startswith("#SBATCH")]
    return dict(line.lstrip("-").partition("=")[::2] for line in lines)


def test_script_asks_for_the_nodes_and_requeues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = write_script(tmp_path, capsys, "nodes=2,gpus_per_node=8,partition=big,time=2:00:00,account=lab")
    sbatch = directives(script)
    assert {k: sbatch[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "partition", "time", "account")} \
        == {"nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "8", "partition": "big", "time": "2:00:00",
            "account": "lab"}
    assert "requeue" in sbatch and sbatch["signal"].startswith("B:USR1@")
    assert sbatch["output"].startswith(str(tmp_path / "run"))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_script_runs_torchrun_on_every_node_with_resume_auto(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    script = write_script(tmp_path, capsys, "nodes=2,gpus_per_node=4,port=29600")
    env = {**os.environ, **fake_path(tmp_path), "SLURM_NNODES": "2", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "node[A-B]"}
    assert subprocess.run(["bash", str(script)], env=env, timeout=60).returncode == 0
    args = (tmp_path / "log" / "srun.args").read_text().splitlines()
    torchrun = args[args.index("torch.distributed.run") + 1:]
    options = dict(zip(torchrun[:10:2], torchrun[1:10:2], strict=True))
    assert options == {"--nnodes": "2", "--nproc-per-node": "4", "--rdzv-backend": "c10d",
                       "--rdzv-endpoint": "nodeA:29600", "--rdzv-id": "77"}
    recipe_args = torchrun[torchrun.index("recipes/llama_pretrain.py") + 1:]
    assert recipe_args[:len(RUN)] == RUN and recipe_args[-2:] == ["--resume", "auto"]
    assert not any(a.startswith("--slurm") for a in recipe_args)
    assert (tmp_path / "log" / "srun.env").read_text().strip() == "1"  # a fresh store for each restart round


def test_time_limit_signal_saves_then_requeues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = write_script(tmp_path, capsys, "nodes=1,gpus_per_node=1")
    log = tmp_path / "log"
    env = {**os.environ, **fake_path(tmp_path), "SLURM_NNODES": "1", "SLURM_JOB_ID": "88", "FAKE_SRUN_WAIT": "1"}
    job = subprocess.Popen(["bash", str(script)], env=env)
    deadline = time.monotonic() + 30
    while not (log / "srun.started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@120` sends the batch shell
    assert job.wait(timeout=30) == 0
    assert (log / "srun.term").read_text().strip() == "saved"  # the step got SIGTERM and finished first
    assert (log / "scontrol.calls").read_text().split() == ["requeue", "88"]


def test_submits_with_sbatch_and_prints_the_job_id(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in fake_path(tmp_path).items():
        monkeypatch.setenv(name, value)
    status, out, err = cli(capsys, *RUN, f"metrics.folder={tmp_path}/run",
                           f"checkpoint.folder={tmp_path}/run/checkpoints", "--slurm", "nodes=2,gpus_per_node=8")
    assert status == 0, err
    assert "submitted job 4711" in out
    assert (tmp_path / "log" / "sbatch.args").read_text().split() == ["--parsable", str(tmp_path / "run" /
                                                                                       "slurm.sbatch")]


@pytest.mark.parametrize(("args", "named"), [
    (["--slurm", "nodes=2,gpu_per_node=8"], "did you mean gpus_per_node"),
    (["--slurm", "nodes=two,gpus_per_node=8"], "--slurm nodes"),
    (["--slurm", "nodes=2"], "needs gpus_per_node"),
    (["--slurm", "nodes=2,gpus_per_node=8", "checkpoint=None"], "checkpoint"),
])
def test_bad_slurm_requests_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                      named: str) -> None:
    status, _, err = cli(capsys, *RUN, f"metrics.folder={tmp_path}/run", *args, "--slurm-script-only")
    assert status == 2
    assert named in err and not own_traceback_frames(err)
    assert not (tmp_path / "run" / "slurm.sbatch").exists()


def test_cpu_device_with_gpus_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = cli(capsys, "debug", f"metrics.folder={tmp_path}/run", "--slurm", "nodes=1,gpus_per_node=8",
                         "--slurm-script-only")
    assert status == 2 and "device=cuda" in err, err
