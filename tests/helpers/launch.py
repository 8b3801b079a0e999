"""Every program a test runs in another process goes through here: a recipe as a user runs it,
or a worker program of tests/helpers/workers, on one process or several under torchrun (the
numerics workers' ranks and `run_recipe`'s one process are forked instead, from a server that
has imported torch: tests/helpers/forked_ranks.py).

Children run with one thread per process, in the checkout's root, with the installed `tessera`
package and with `tests/` importable (so workers and checkpointed configs find `helpers.*`);
the checkout's root is not on their path, so its folders do not import under their old
top-level names.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
WORKERS = Path(__file__).resolve().parent / "workers"


def recipe_script(name: str) -> Path:
    """The recipe script `recipes/<name>.py`, as a user runs it."""
    return ROOT / "recipes" / f"{name}.py"


def worker(name: str) -> Path:
    """The worker program `tests/helpers/workers/<name>.py`."""
    return WORKERS / f"{name}.py"


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: 1 thread, `tests/` on the path; `env` on top."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}


def command(program: Path, *args: str, processes: int = 1, options: Sequence[str] = ()) -> list[str]:
    """`python program ARGS` for one process; for several, the same under torchrun (standalone,
    `options` passed to torchrun itself, e.g. --log-dir)."""
    if processes == 1 and not options:
        return [sys.executable, str(program), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            *options, str(program), *args]


def run_program(program: Path, *args: str, processes: int = 1, timeout: float = 600,
                env: dict[str, str] | None = None, options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run `program ARGS` on `processes` CPU processes (see `command`) and wait; stdout and
    stderr captured as text."""
    return subprocess.run(command(program, *args, processes=processes, options=options), text=True,
                          capture_output=True, cwd=ROOT, timeout=timeout, env=environment(env))


def torchrun(program: Path, *args: str, processes: int = 2, timeout: float = 600, env: dict[str, str] | None = None,
             options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`run_program` on 2 processes unless told otherwise: the multi-process tests' launch."""
    return run_program(program, *args, processes=processes, timeout=timeout, env=env, options=options)


def start(program: Path, *args: str, processes: int = 1, env: dict[str, str] | None = None,
          **popen: object) -> subprocess.Popen[str]:
    """Start `program ARGS` as `run_program` would run it, without waiting (for tests that signal or
    kill it); `popen` are subprocess.Popen's own arguments (stdout=PIPE, ...)."""
    return subprocess.Popen(command(program, *args, processes=processes), text=True, cwd=ROOT,
                            env=environment(env), **popen)


# What a run reads when it starts, not when torch is imported: a forked run takes them as a fresh
# interpreter would. Any other variable (PYTHONPATH, TORCH_*, OMP_*, LD_*, MALLOC_*, locale, ...)
# gets a fresh interpreter.
RUN_TIME_VARIABLES = ("COLUMNS", "TESSERA_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_recipe(*args: str, recipe: str = "llama_pretrain", env: dict[str, str] | None = None,
               timeout: float = 120, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python recipes/<recipe>.py ARGS` in a process of its own, as a user would, and wait:
    its exit code, stdout and stderr as text.

    Unless `fresh`, the process is forked from a server that has imported torch and its
    compiler (`forked_ranks.run_ranks`): a `--dry-run` took 0.8 s instead of 4.9 (2-core Zen
    3), as a fresh interpreter's imports cost more than most of these short runs. What differs
    from `python` is said there: the interpreter's finalization (where an undestroyed process
    group or the profiler can abort it) is skipped, warnings printed while torch is imported go
    to the server, and import-time variables are the server's, so an `env` outside
    `RUN_TIME_VARIABLES` gets a fresh interpreter. `fresh=True` for a test of what those cover;
    launches, signals and restarts are tested on fresh ones (`run_program`, `start`, `torchrun`)."""
    from helpers import forked_ranks  # it builds on this module's environment

    env = {"COLUMNS": "200", **(env or {})}
    if fresh or not all(key.startswith(RUN_TIME_VARIABLES) for key in env):
        return run_program(recipe_script(recipe), *args, timeout=timeout, env=env)
    return forked_ranks.run_ranks(recipe_script(recipe), *args, processes=1, timeout=timeout, env=env)


@contextlib.contextmanager
def child_cpu_seconds() -> Iterator[list[float]]:
    """CPU seconds (user + system) the subprocesses finished inside the block used, in the
    yielded list's one item: a cost that, unlike wall time, does not grow when other work
    shares the machine's cores."""
    def used() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    out = [0.0]
    begin = used()
    yield out
    out[0] = used() - begin


def own_traceback_frames(text: str) -> list[str]:
    """The traceback lines (`File "...", line N`) in `text` that point into this project's own
    code: the checkout (recipes, tests, the package's folders) or an installed `tessera`
    package, but not the Python environment (torch, torchrun), wherever that lives, the
    checkout's own .venv included."""
    environments = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    own = []
    for line in re.findall(r'File "[^"]+", line \d+', text):
        name = line.split('"')[1]
        if not Path(name).is_absolute():  # "<frozen runpy>", "<string>": no file of ours
            continue
        path = Path(name).resolve()
        installed = "tessera" in path.parts and "site-packages" in path.parts
        in_environment = any(path.is_relative_to(prefix) for prefix in environments)
        if installed or (path.is_relative_to(ROOT) and not in_environment):
            own.append(line)
    return own
