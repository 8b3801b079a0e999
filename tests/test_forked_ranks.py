"""The test launcher of forked ranks (tests/helpers/forked_ranks.py), against what torchrun gives a
worker: each rank's distributed variables and arguments, its output returned, a failing rank's
exit ending its peers and failing the launch, and a launch past its limit killed."""

from __future__ import annotations

import subprocess
import time

import pytest

from helpers.forked_ranks import run_ranks

PROGRAM = """
import os, sys, time
print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], sys.argv[1:], os.environ["OMP_NUM_THREADS"])
if sys.argv[1] == "fail" and os.environ["RANK"] == "1":
    sys.exit(3)
if sys.argv[1] != "ok":
    time.sleep(120)  # the peer of a failing rank, or a hang
"""


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "ranks.py"
    path.write_text(PROGRAM)
    return path


def test_each_rank_runs_the_program_with_its_rank_and_arguments(program):
    done = run_ranks(program, "ok", processes=3)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"rank {r} of 3 ['ok'] 1" for r in range(3)]


def test_a_failing_rank_ends_its_peers_and_fails_the_launch(program):
    start = time.monotonic()
    done = run_ranks(program, "fail", processes=2)
    assert done.returncode == 1
    assert time.monotonic() - start < 60  # rank 0 would sleep 120 s


def test_a_launch_past_its_limit_is_killed(program):
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_ranks(program, "hang", processes=2, timeout=3)
    assert time.monotonic() - start < 60
