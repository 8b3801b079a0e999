"""A worker program's ranks forked from a server process that has already imported torch, its
compiler, DTensor and fiddle, instead of started afresh by torchrun.

Why: on a 2-core CI machine each torchrun launch paid ~2 CPU-s for its agent and each rank
~3.5 CPU-s to import the same libraries again (torch's optimizers import its compiler on their
first step), so the numerics workers spent minutes of the suite starting up. The tests that use
this compare parallel layouts' numbers with one process's; how a run is launched and how its
processes end (torchrun restarts, signals, its logs, several nodes, the interpreter's teardown
of gloo) stays tested through torchrun itself (`helpers.launch.torchrun`).

What a rank gets is what torchrun gives a worker on one node: RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT and a rendezvous store the
launcher holds (TORCHELASTIC_USE_AGENT_STORE, so no rank races another program for a port); the
launch's environment (`launch.environment`), `sys.argv`, the checkout's root as its working
folder and `python program`'s path (the program's folder, PYTHONPATH, the interpreter's own);
the program runs as `__main__`, then the interpreter's thread join and exit handlers. Unlike a
fresh process, a rank ends with `os._exit` after them (the interpreter's finalization is
skipped), and variables that torch reads on import come from the server's environment (so
`env` may not set them). A rank that fails ends the others, as torchrun does.
"""

from __future__ import annotations

import atexit
import functools
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from helpers.launch import ROOT, environment

# Imported once by the server (in each pytest process that launches ranks), not by every rank.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.tensor", "torch.distributed.checkpoint",
           "torch.distributed.fsdp", "fiddle", "safetensors.torch"]
IMPORT_TIME_PREFIXES = ("TORCH", "OMP_", "MKL_", "PYTHON")  # read when the server imported torch
GRACE_SECONDS = 10.0  # a failed rank's peers get this long to end on SIGTERM before SIGKILL


@functools.cache
def _server() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server started now with the preload and the launches'
    environment (one OpenMP thread). The server is one per process: if another caller started
    it first, ranks import what it lacks themselves."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.update(environment())
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


@functools.cache
def _interpreter_path() -> tuple[str, ...]:
    """sys.path of a bare `python` here, after its script folder (what PYTHONPATH adds to)."""
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                          capture_output=True, text=True, check=True, env=bare)
    return tuple(json.loads(done.stdout))


def _rank(program: str, args: list[str], env: dict[str, str], path: list[str], out: str, err: str) -> None:
    """One rank: stdout and stderr into `out` and `err`, `env` as the whole environment, `path`
    as sys.path, then `program` as `python program ARGS` runs it, up to its exit handlers."""
    for fd, name in ((1, out), (2, err)):
        file = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.argv, sys.path[:] = [program, *args], path
    multiprocessing.set_start_method(None, force=True)  # the platform's default, as under `python` (not forkserver)
    code: int | str | None = 0
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints it, then the exit code 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's order: non-daemon threads joined, then exit handlers
    atexit._run_exitfuncs()  # multiprocessing ends a child with os._exit, which skips them
    sys.exit(code)  # multiprocessing turns it into the exit code (a message: printed, then 1)


def run_ranks(program: Path, *args: str, processes: int = 2, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `program ARGS` on `processes` forked ranks (1: one process without the distributed
    variables) and wait; the ranks' stdout and stderr (rank 0's first) come back as text.
    returncode: one process's own exit code (as `python program` would end: 2 for a usage
    error, -N for signal N); of several, 0, or 1 when a rank failed (its peers are then ended). Raises
    subprocess.TimeoutExpired after `timeout` s, the ranks killed; ValueError for an `env`
    variable that torch reads on import (use `launch.torchrun` for those)."""
    refused = [key for key in env or {} if key.startswith(IMPORT_TIME_PREFIXES)]
    if refused:
        raise ValueError(f"{refused}: read when torch is imported, which forked ranks do not do; use launch.torchrun")
    import torch.distributed as dist

    context, launch_env = _server(), environment(env)
    path = [str(Path(program).parent), *(p for p in launch_env["PYTHONPATH"].split(os.pathsep) if p),
            *_interpreter_path()]
    # the rendezvous store torchrun's agent would hold: bound here, so its port is taken before any rank starts
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if processes > 1 else None
    command = [f"<{processes} forked ranks>", str(program), *args]
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        outputs = [(Path(folder, f"{rank}.out"), Path(folder, f"{rank}.err")) for rank in range(processes)]
        ranks: list[multiprocessing.process.BaseProcess] = []
        try:
            for rank, (out, err) in enumerate(outputs):
                rank_env = dict(launch_env)
                if store is not None:  # one process runs as `python program` would, as `launch.command` has it
                    rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
                                 "LOCAL_WORLD_SIZE": str(processes), "GROUP_WORLD_SIZE": "1",
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                                 "TORCHELASTIC_USE_AGENT_STORE": str(True), "TORCHELASTIC_RESTART_COUNT": "0"}
                ranks.append(context.Process(target=_rank, name=f"rank-{rank}",
                                             args=(str(program), list(args), rank_env, path, str(out), str(err))))
                ranks[-1].start()
            failed = _wait(ranks, deadline=time.monotonic() + timeout)
        finally:
            _end(ranks)
            del store
        stdout, stderr = ("".join(p.read_text(errors="replace") for p in paths if p.exists())
                          for paths in zip(*outputs))
    if failed is None:
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    code = ranks[0].exitcode if processes == 1 else int(failed)
    return subprocess.CompletedProcess(command, code, stdout, stderr)


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
