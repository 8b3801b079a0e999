"""A worker program's ranks forked from a server process that has already imported torch, its
compiler, DTensor and fiddle, instead of started afresh by torchrun.

Why: on a 2-core CI machine each torchrun launch paid ~2 CPU-s for its agent and each rank
~3.5 CPU-s to import the same libraries again (torch's optimizers import its compiler on their
first step), so the numerics workers below spent minutes of the suite starting up. The tests
that use this compare parallel layouts' numbers with one process's; how a run is launched
(torchrun restarts, signals, its logs, several nodes) stays tested through torchrun itself
(`helpers.launch.torchrun`).

What a rank gets is what a plain env:// launch gives it (the `srun` path of
`components/parallel/process_group.py`): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR/MASTER_PORT (rank 0 hosts the store), the launch's environment (`launch.environment`),
`sys.argv`, the checkout's root as its working folder, the program's folder first on its path,
and the program run as `__main__` with the interpreter's exit handlers run at its end. A rank
that fails ends the others, as torchrun does.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers.launch import ROOT, environment

# Imported once by the server (in each pytest process that launches ranks), not by every rank.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.tensor", "torch.distributed.checkpoint",
           "torch.distributed.fsdp", "fiddle", "safetensors.torch"]
GRACE_SECONDS = 10.0  # a failed rank's peers get this long to end on SIGTERM before SIGKILL

_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its preload set before its server first starts (the server is one
    per process: if another caller started it first, ranks import what it lacks themselves)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(program: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """One rank: stdout and stderr into `out` and `err`, `env` as the whole environment, then
    `program` as `python program ARGS` would run it."""
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.argv = [program, *args]
    first = [str(Path(program).parent), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    rest = [p for p in sys.path if p and Path(p).resolve() != ROOT and p not in first]
    sys.path[:] = [*dict.fromkeys(first), *rest]  # as `python program` has it: the root is not on it
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # the server's OpenMP read its own environment
    try:
        runpy.run_path(program, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends a child with os._exit, which skips them


def run_ranks(program: Path, *args: str, processes: int = 2, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `program ARGS` on `processes` forked ranks (1: one process without the distributed
    variables) and wait; the ranks' stdout and stderr (rank 0's first) come back as text.
    returncode: 0, or 1 when a rank failed (its peers are then ended). Raises
    subprocess.TimeoutExpired after `timeout` s, the ranks killed."""
    context, port = _server(), _free_port()
    command = [f"<{processes} forked ranks>", str(program), *args]
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        outputs = [(Path(folder, f"{rank}.out"), Path(folder, f"{rank}.err")) for rank in range(processes)]
        ranks = []
        for rank, (out, err) in enumerate(outputs):
            rank_env = environment(env)
            if processes > 1:  # one process runs as `python program` would, as `launch.command` has it
                rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                             "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            ranks.append(context.Process(target=_rank, args=(str(program), list(args), rank_env, str(out), str(err)),
                                         name=f"rank-{rank}"))
            ranks[-1].start()
        try:
            failed = _wait(ranks, deadline=time.monotonic() + timeout)
        finally:
            _end(ranks)
        stdout, stderr = ("".join(p.read_text(errors="replace") for p in paths if p.exists())
                          for paths in zip(*outputs))
    if failed is None:
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(command, int(failed), stdout, stderr)


def _wait(ranks: list, *, deadline: float) -> bool | None:
    """Wait for every rank to end (False), or for the first to fail (True); None at `deadline`."""
    pending = list(ranks)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ended = multiprocessing.connection.wait([rank.sentinel for rank in pending], timeout=left)
        for rank in [r for r in pending if r.sentinel in ended]:
            rank.join()
            pending.remove(rank)
            if rank.exitcode != 0:
                return True
    return False


def _end(ranks: list) -> None:
    """SIGTERM to every rank still running, SIGKILL to any left after the grace period."""
    for rank in ranks:
        if rank.is_alive():
            rank.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for rank in ranks:
        rank.join(max(0.0, deadline - time.monotonic()))
        if rank.is_alive():
            rank.kill()
            rank.join()
