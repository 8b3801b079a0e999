"""The rendezvous of a run started by `srun` with no torchrun: SLURM's variables, in torch's names.

Under `srun python recipes/X.py ...` (one task per GPU), SLURM starts every process itself and
says who each one is in `SLURM_PROCID` (global rank), `SLURM_STEP_NUM_TASKS` / `SLURM_NTASKS`
(world size), `SLURM_LOCALID` (rank on its node), `SLURM_JOB_NODELIST` (the hosts, in the compact
`node[01-04]` form) and `SLURM_JOB_ID`. torch's `env://` rendezvous reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT instead; `torch_env_from_slurm` derives them: the
master is the first host of the node list (where SLURM_PROCID 0 runs under the default block
distribution), the port a function of the job id, so every task of one job agrees on both
without talking and two jobs sharing a node rarely collide.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping

PORT_BASE = 20000
"""Lowest port `master_port` hands out (above the usual ephemeral-free registered services)."""
PORT_SPAN = 20000
"""How many ports the job id is folded into: 20000-39999, below Linux's ephemeral range (32768+
overlaps a little; a port already taken fails loudly in init_process_group, naming it)."""


class SlurmEnvError(ValueError):
    """SLURM's variables are present but cannot name a rendezvous (says which and how to fix it)."""


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for a process SLURM started as one
    task of a step; `{}` when `environ` is not such a process (no SLURM_PROCID, or torchrun's
    RANK already set, which wins) or is a step of one task (a group of one needs no rendezvous).
    MASTER_ADDR / MASTER_PORT already in `environ` are kept (a user's choice of interface or
    port). Raises SlurmEnvError for a task count or node list it cannot read."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not tasks or not nodes:
        raise SlurmEnvError("SLURM_PROCID is set but SLURM_NTASKS or SLURM_JOB_NODELIST is not, so the run cannot "
                            "tell how many processes to wait for or where rank 0 is; start it with srun (which sets "
                            "them), or under torchrun, or unset SLURM_PROCID for a single-process run")
    derived = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
               "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_hostlist(nodes)[0],
               "MASTER_PORT": environ.get("MASTER_PORT") or str(master_port(environ.get("SLURM_JOB_ID", "0")))}
    if derived["WORLD_SIZE"] == "1":  # one task: a group of one picks its own free port (two in one job may run)
        return {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if not derived[name].isdigit():
            raise SlurmEnvError(f"{name} derived from SLURM is {derived[name]!r}, not a whole number; check the "
                                "SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID the job step sets")
    return derived


def master_port(job_id: str) -> int:
    """The rendezvous port of job `job_id` (a number; an array job's `123_4` uses its digits)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def expand_hostlist(hostlist: str) -> list[str]:
    """The host names of SLURM's compact list, in order: `node[01-03,7],gpu1` ->
    [node01, node02, node03, node7, gpu1]; several bracket groups in one name expand as a
    product (`r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2). Zero padding follows the range's start.
    Raises SlurmEnvError for an unbalanced bracket or a range that runs backwards."""
    hosts: list[str] = []
    for pattern in _split_top_level(hostlist):
        parts = re.split(r"(\[[^\]]*\])", pattern)
        if any("[" in p or "]" in p for p in parts if not (p.startswith("[") and p.endswith("]"))):
            raise SlurmEnvError(f"cannot read the node list {hostlist!r}: unbalanced brackets in {pattern!r}")
        choices = [_expand_brackets(p, hostlist) if p.startswith("[") else [p] for p in parts]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise SlurmEnvError(f"the node list {hostlist!r} names no host")
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """`a[1,2],b` -> [`a[1,2]`, `b`]: commas inside brackets separate ranges, not hosts."""
    out, depth, current = [], 0, ""
    for char in hostlist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*out, current] if p]


def _expand_brackets(group: str, hostlist: str) -> list[str]:
    """`[01-03,7]` -> [01, 02, 03, 7]."""
    values: list[str] = []
    for item in group[1:-1].split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise SlurmEnvError(f"cannot read the node list {hostlist!r}: {item!r} is not a number or a range")
        if not high:
            values.append(low)
            continue
        if int(high) < int(low):
            raise SlurmEnvError(f"cannot read the node list {hostlist!r}: the range {item!r} runs backwards")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def adopt_slurm_rendezvous() -> None:
    """Set this process's RANK, WORLD_SIZE, ... from SLURM's variables when srun started it with
    no torchrun (see `torch_env_from_slurm`); nothing otherwise. Call before anything reads
    WORLD_SIZE (a parallel plan checks its degrees against it before joining the group)."""
    os.environ.update(torch_env_from_slurm(os.environ))
