"""`--slurm nodes=N,gpus_per_node=G[,partition=P,time=T,account=A,...]`: run the recipe as a SLURM job.

The command line validates the config as for a local run, then writes one sbatch script into
the run's folder and submits it with `sbatch` (or only writes it, with `--slurm-script-only`).
The script starts one `torchrun` per node with `srun`, all meeting at a c10d rendezvous on the
job's first node, and runs the same recipe with the same arguments plus `--resume auto`, so the
one command both starts the job and continues it after a requeue:

- preemption: SLURM sends SIGTERM to every task; torchrun passes it to the ranks, which finish
  their step, save a checkpoint and exit (`tessera.components.train.preemption`), and
  `#SBATCH --requeue` puts the job back in the queue;
- time limit: `--signal=B:USR1@SECONDS` warns the batch shell first; its trap sends SIGTERM to
  the step (the same save) and requeues the job with `scontrol requeue`.

The checkpoint folder must be on a file system every node sees (each rank writes its shard of a
checkpoint there, and a requeued job may land on other nodes).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tessera.registry.errors import ConfigError, Fault


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlurmJob:
    """What `--slurm` asked for: SLURM's resources and the rendezvous settings of the job."""

    nodes: int
    gpus_per_node: int
    """Processes (ranks) per node: torchrun's --nproc-per-node, and the GPUs each node asks for."""
    partition: str | None = None
    time: str | None = None
    """SLURM's time limit (`HH:MM:SS`, `D-HH:MM:SS`); the cluster's default when None."""
    account: str | None = None
    qos: str | None = None
    cpus_per_node: int | None = None
    """CPUs for each node's one task (torchrun and its ranks); the cluster's default when None."""
    port: int = 29500
    """The c10d rendezvous port on the job's first node."""
    max_restarts: int = 3
    """torchrun restarts of a failed worker group inside one allocation (each resumes from the
    newest checkpoint) before the job fails."""
    signal_seconds: int = 120
    """How long before the time limit SLURM warns the job, to save and requeue."""


_INTS = {"nodes", "gpus_per_node", "cpus_per_node", "port", "max_restarts", "signal_seconds"}
_KEYS = [f.name for f in dataclasses.fields(SlurmJob)]
EXAMPLE = "--slurm nodes=2,gpus_per_node=8,partition=gpu,time=24:00:00"


def parse_spec(spec: str) -> SlurmJob:
    """`nodes=2,gpus_per_node=8,partition=gpu` -> SlurmJob; ConfigError naming each bad item."""
    faults, values = [], {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not value.strip():
            faults.append(Fault(f"--slurm {item}", "each item is key=value", f"e.g. {EXAMPLE}"))
        elif key not in _KEYS:
            near = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            faults.append(Fault(f"--slurm {key}", "is not a setting --slurm knows", f"{hint}known: {', '.join(_KEYS)}"))
        elif key in _INTS and not (value.strip().isdigit() and int(value) > 0):
            faults.append(Fault(f"--slurm {key}", f"must be a whole number above 0, got {value!r}", f"e.g. {EXAMPLE}"))
        else:
            values[key] = int(value) if key in _INTS else value.strip()
    missing = [k for k in ("nodes", "gpus_per_node") if k not in values]
    if missing:
        faults.append(Fault("--slurm", f"needs {' and '.join(missing)}", f"e.g. {EXAMPLE}"))
    if faults:
        raise ConfigError(faults)
    return SlurmJob(**values)


def run_folder(config: Any) -> Path:
    """Where the job's script and log go: the run's metrics folder, else its checkpoints' parent."""
    metrics = config.__arguments__.get("metrics")
    if metrics is not None and getattr(metrics, "folder", None):
        return Path(metrics.folder)
    return Path(config.__arguments__["checkpoint"].folder).parent


def check_config(config: Any, job: SlurmJob) -> None:
    """ConfigError for a run a requeued multi-GPU job cannot serve: no checkpoints to resume
    from, or a device that leaves the GPUs it asks for unused."""
    arguments = getattr(config, "__arguments__", {})
    faults = []
    if arguments.get("checkpoint") is None:
        faults.append(Fault("checkpoint", "a SLURM job is requeued on preemption and resumes from the run's newest "
                            "checkpoint, and this run writes none", "set checkpoint (e.g. the preset's run_outputs)"))
    if job.gpus_per_node and arguments.get("device", "cpu") == "cpu":
        faults.append(Fault("device", f"the job asks for {job.gpus_per_node} GPUs per node but the run trains on "
                            "device=cpu", "add device=cuda to the command line"))
    if faults:
        raise ConfigError(faults)


def run_command(*, script: str, args: list[str], load: str | None, from_hf: str | None,
                export_hf: str | None) -> list[str]:
    """The recipe's own arguments as each node reruns them, with `--resume auto` (whatever
    --resume was given: after a requeue the newest checkpoint is the one to continue)."""
    command = [script, *args]
    for flag, value in (("--load", load), ("--from-hf", from_hf), ("--export-hf", export_hf)):
        if value is not None:
            command += [flag, value]
    return [*command, "--resume", "auto"]


def sbatch_script(*, job: SlurmJob, name: str, folder: Path, workdir: Path, python: str,
                  command: list[str]) -> str:
    """The batch script: SLURM's resources, the requeue trap, and `srun` starting one torchrun per
    node that runs `python command...` on `job.gpus_per_node` ranks."""
    directives = [f"--job-name={name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={job.gpus_per_node}", f"--chdir={workdir}",
                  f"--output={folder.resolve() / 'slurm-%j.out'}", "--open-mode=append", "--requeue",
                  f"--signal=B:USR1@{job.signal_seconds}"]
    optional = {"partition": job.partition, "time": job.time, "account": job.account, "qos": job.qos,
                "cpus-per-task": job.cpus_per_node}
    directives += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    torchrun = [shlex.quote(python), "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES",
                "--nproc-per-node", str(job.gpus_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"$head:{job.port}", "--rdzv-id", "$SLURM_JOB_ID",
                "--max-restarts", str(job.max_restarts)]
    launch = " ".join(["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                       *torchrun, *(shlex.quote(a) for a in command)])
    return "\n".join([
        "#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
        "# Written by the recipe's --slurm; the same command starts the run and, after a requeue, resumes it.",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# Each restart round's workers meet at a store of their own: nodes may count restarts differently,",
        "# and a store shared across rounds would hand a new round the keys of the one that failed.",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        "requeue_before_time_limit() {",
        '  echo "tessera: time limit near; each rank saves a checkpoint, then the job is requeued"',
        '  kill -TERM "$step" 2>/dev/null  # srun passes SIGTERM to torchrun, torchrun to the ranks',
        '  wait "$step"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "}",
        "trap requeue_before_time_limit USR1",
        f"{launch} &",
        "step=$!",
        'wait "$step"  # returns early when USR1 arrives; the trap then waits for the save',
        "", ])


def submit(*, config: Any, spec: str, script_only: bool, name: str, script: str, args: list[str],
           load: str | None, from_hf: str | None, export_hf: str | None) -> str:
    """Write the job's script into the run's folder and, unless `script_only`, submit it with
    `sbatch`; returns the line to print (the job id, or where the script is). ConfigError for a
    bad spec or run, or an sbatch that is missing or refuses the job."""
    job = parse_spec(spec)
    check_config(config, job)
    folder = run_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slurm.sbatch"
    command = run_command(script=script, args=args, load=load, from_hf=from_hf, export_hf=export_hf)
    path.write_text(sbatch_script(job=job, name=name, folder=folder, workdir=Path.cwd(), python=sys.executable,
                                  command=command))
    if script_only:
        return f"slurm: wrote {path} (submit it with: sbatch {path})"
    return f"slurm: submitted job {_sbatch(path)} ({job.nodes} nodes x {job.gpus_per_node} GPUs; script {path}, " \
           f"log {folder / 'slurm-JOBID.out'})"


def _sbatch(path: Path) -> str:
    """Submit `path`; the job id sbatch answers."""
    if shutil.which("sbatch") is None:
        raise ConfigError([Fault("--slurm", "sbatch is not on PATH, so the job cannot be submitted from here",
                                 f"run the command on the cluster's login node, or add --slurm-script-only and "
                                 f"submit {path} yourself")])
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        raise ConfigError([Fault("--slurm", f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}",
                                 f"fix the resources in --slurm, or edit {path} and submit it with sbatch")])
    return done.stdout.strip().split(";")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe command line's --slurm and --slurm-script-only."""
    parser.add_argument("--slurm", metavar="nodes=N,gpus_per_node=G[,partition=P,time=T,account=A]",
                        help="run as a SLURM job: write an sbatch script into the run's folder (srun + torchrun on "
                             "every node, requeued on preemption, resumed with --resume auto) and submit it; "
                             f"keys: {', '.join(_KEYS)}")
    parser.add_argument("--slurm-script-only", action="store_true",
                        help="with --slurm: write the sbatch script and print its path, without submitting it")
