"""The test launcher of forked ranks (tests/helpers/forked_ranks.py), against what `python
program` under torchrun gives a worker: its rank's variables, arguments, working folder, path and
thread count, its output returned rank by rank, its exit handlers run; a failing rank's exit
ending its peers (no process left) and failing the launch; a launch past its limit killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers.forked_ranks import run_ranks
from helpers.launch import ROOT, environment

PROGRAM = """
import atexit, json, multiprocessing, os, sys, time
import torch

def main():
    mode, pids = sys.argv[1], sys.argv[2]
    rank = os.environ.get("RANK")
    with open(os.path.join(pids, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(json.dumps({"rank": rank, "world": os.environ.get("WORLD_SIZE"), "args": sys.argv[1:], "cwd": os.getcwd(),
                      "path0": sys.path[0], "path": sys.path, "threads": torch.get_num_threads(),
                      "start_method": multiprocessing.get_start_method()}))
    print(f"stderr of {rank}", file=sys.stderr)
    atexit.register(print, f"exit handler of {rank}")
    if mode == "fail" and rank == "1":
        raise ValueError("rank 1 fails")
    if mode != "ok":
        time.sleep(120)  # the peer of a failing rank, or a hang

if __name__ == "__main__":
    main()
"""


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "program" / "ranks.py"
    path.parent.mkdir()
    path.write_text(PROGRAM)
    (tmp_path / "pids").mkdir()
    return path


def _reports(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _all_ended(pids) -> bool:
    for file in pids.glob("*.pid"):
        try:
            os.kill(int(file.read_text()), 0)
        except ProcessLookupError:
            continue
        return False
    return True


def test_each_rank_runs_the_program_as_python_would(program):
    pids = program.parent.parent / "pids"
    done = run_ranks(program, "ok", str(pids), processes=3)
    assert done.returncode == 0, done.stderr
    reports = _reports(done.stdout)
    assert [r["rank"] for r in reports] == ["0", "1", "2"]  # rank 0's output first
    for r in reports:
        assert r["world"] == "3" and r["args"] == ["ok", str(pids)] and r["threads"] == 1
        assert r["cwd"] == str(ROOT) and r["path0"] == str(program.parent)
        assert str(ROOT) not in r["path"]
    assert [line for line in done.stdout.splitlines() if line.startswith("exit handler")] == \
        [f"exit handler of {r}" for r in range(3)]
    assert done.stderr.splitlines() == [f"stderr of {r}" for r in range(3)]


def test_one_process_has_no_distributed_variables(program):
    done = run_ranks(program, "ok", str(program.parent.parent / "pids"), processes=1)
    assert done.returncode == 0, done.stderr
    assert [(r["rank"], r["world"]) for r in _reports(done.stdout)] == [(None, None)]
    fresh = subprocess.run([sys.executable, "-c", "import multiprocessing; print(multiprocessing.get_start_method())"],
                           capture_output=True, text=True, check=True)
    assert _reports(done.stdout)[0]["start_method"] == fresh.stdout.strip()  # not the server's forkserver


ENDINGS = """
import atexit, sys
atexit.register(print, "exit handler")
how = sys.argv[1]
if how == "code":
    sys.exit(2)
if how == "message":
    sys.exit("stopped: a message")
raise ValueError("the program fails")
"""


@pytest.mark.parametrize("how", ["code", "message", "exception"])
def test_one_process_ends_as_python_ends_it(tmp_path, how):
    """One forked process (what `launch.run_recipe` runs) gives the exit code, stderr and exit
    handlers' output of the same program under a fresh `python`."""
    program = tmp_path / "ends.py"
    program.write_text(ENDINGS)
    forked = run_ranks(program, how, processes=1)
    fresh = subprocess.run([sys.executable, str(program), how], capture_output=True, text=True, cwd=ROOT,
                           env=environment())
    assert fresh.returncode in (1, 2) and fresh.stdout == "exit handler\n"
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]  # the message or the exception


def test_a_failing_rank_ends_its_peers_and_fails_the_launch(program):
    pids = program.parent.parent / "pids"
    start = time.monotonic()
    done = run_ranks(program, "fail", str(pids), processes=2)
    assert done.returncode == 1
    assert "ValueError: rank 1 fails" in done.stderr
    assert time.monotonic() - start < 60 and _all_ended(pids)  # rank 0 would sleep 120 s


def test_a_launch_past_its_limit_is_killed(program):
    pids = program.parent.parent / "pids"
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_ranks(program, "hang", str(pids), processes=2, timeout=5)
    assert time.monotonic() - start < 60 and _all_ended(pids)


def test_variables_torch_reads_on_import_are_refused(program):
    with pytest.raises(ValueError, match="TORCH_LOGS"):
        run_ranks(program, "ok", "x", env={"TORCH_LOGS": "+dynamo"})
