"""Hangs and stragglers named: the watchdog's limit, the record of collectives, the message a
hang ends with, the straggler notes; then two ranks under torchrun with one rank hung (the
run exits soon after the limit, naming it) or slowed (named as a straggler)."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from tessera.components.train.collective_record import CollectiveRecord
from tessera.components.train.hang_report import RankReport, behind, hang_message
from tessera.components.train.stragglers import StragglerTracker
from tessera.components.train.watchdog import HANG_EXIT_STATUS, Watchdog

from helpers.launch import ROOT, environment, worker


def test_limit_is_the_explicit_one_or_factor_times_median_with_a_floor():
    assert Watchdog(limit_s=7.0).limit([100.0]) == 7.0
    assert Watchdog(floor_s=60.0, first_step_s=600.0).limit([]) == 600.0  # no median yet
    assert Watchdog(floor_s=60.0, factor=10.0).limit([1.0, 2.0, 300.0]) == 60.0  # 10 x 2 s under the floor
    assert Watchdog(floor_s=60.0, factor=10.0).limit([9.0, 12.0, 10.0, 500.0]) == 110.0  # median 11 s


def naive_stragglers(times: list[list[float]], margin: float, run: int) -> list[tuple[int, int]]:
    """(step, rank) where rank's streak of steps above margin x the others' median reaches `run`."""
    fired, streak = [], {}
    for step, row in enumerate(times):
        for rank, t in enumerate(row):
            rest = sorted(row[:rank] + row[rank + 1:])
            mid = (rest[(len(rest) - 1) // 2] + rest[len(rest) // 2]) / 2
            streak[rank] = streak.get(rank, 0) + 1 if t > margin * mid else 0
            if streak[rank] == run:
                fired.append((step, rank))
    return fired


def test_straggler_notes_match_a_naive_count():
    rng = random.Random(0)
    times = [[rng.uniform(0.9, 1.1) * (2.0 if rank == 2 and 5 <= step < 12 else 1.0) for rank in range(4)]
             for step in range(20)]
    times[3][1] = 5.0  # one slow step alone is no straggler
    tracker = StragglerTracker(margin=1.5, steps=5)
    seen = [(step, int(note.split()[2])) for step, row in enumerate(times) for note in tracker.observe(row)]
    assert seen == naive_stragglers(times, 1.5, 5) == [(9, 2)]
    assert StragglerTracker(margin=1.5, steps=5).observe([1.0, 1.0, 2.0]) == []  # one slow step: not yet
    assert StragglerTracker(margin=1.5, steps=1).observe([1.0, 1.0, 2.0]) == [
        "straggler: rank 2 took 2.0x the median step time for the last 1 steps (its own work, without waiting "
        "for other ranks)"]


def test_a_straggler_needs_a_margin_above_one():
    with pytest.raises(ValueError, match="watchdog.straggler_margin"):
        StragglerTracker(margin=0.5, steps=3)


def report(rank: int, step: int, collective: int) -> RankReport:
    return RankReport(rank=rank, step=step, seconds=61.0, collective=collective, collective_name="all_reduce",
                      collective_step=step)


def test_the_ranks_behind_are_named():
    reports = [report(0, 7, 40), report(1, 7, 39), report(2, 6, 35), report(3, 7, 40)]
    assert behind(reports, 5) == [1, 2, 4]  # fewer collectives, an earlier step, no report
    message = hang_message(reports, world_size=5, limit_s=60)
    assert message.splitlines()[0].startswith("hang: ranks 1, 2, 4 did not arrive")
    assert "rank 4: sent no report" in message
    assert "rank 1: in step 7 for 61 s; last collective entered: all_reduce #39 (entered at step 7)" in message
    same = [report(0, 3, 9), report(1, 3, 9)]
    assert behind(same, 2) == []
    assert "every rank entered the same collective at step 3" in hang_message(same, world_size=2, limit_s=60)


def test_collectives_are_recorded_and_unwrapped_after(tmp_path: Path):
    original = dist.all_reduce
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        import torch

        with CollectiveRecord() as record:
            record.step = 4
            dist.all_reduce(torch.ones(2))
            dist.barrier()
            last = record.snapshot()
            with pytest.raises(RuntimeError, match="already active"):
                CollectiveRecord().__enter__()
        assert (last.name, last.number, last.step) == ("barrier", 2, 4)
        assert dist.all_reduce is original
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a fresh interpreter importing torch: about 5 s
def test_one_process_hang_exits_with_a_message():
    program = ("import time\nfrom tessera.components.train.watchdog import StepWatch, Watchdog\n"
               "with StepWatch(options=Watchdog(limit_s=0.5), poll_s=0.05) as watch:\n"
               "    watch.begin(3)\n    time.sleep(60)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          env=environment())
    assert done.returncode == HANG_EXIT_STATUS, done.stderr
    assert "hang: step 3 ran past the watchdog limit of 0.5 s" in done.stderr
    assert time.monotonic() - started < 30


ARGS = ["debug", "batch_size=2", "seq_len=32", "compute.threads=1", "parallel=@fsdp", "checkpoint=None",
        "precision=@fp32", "metrics.peak_flops=1e12",
        "metrics.plots=False", "metrics.tensorboard=False", "progress.log_every=1"]


def torchrun(folder: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(worker("watchdog_faults")), *ARGS, f"metrics.folder={folder}", *extra]
    return subprocess.Popen(command, text=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=environment({"PYTHONUNBUFFERED": "1", "COLUMNS": "200", **env}))


@pytest.mark.slow
def test_a_slow_rank_is_named_then_its_hang_ends_the_run_soon_after_the_limit(tmp_path: Path):
    """Rank 1 sleeps `extra_s` after each of steps 0-3 (a straggler), then hangs in step 4."""
    limit, grace, extra_s = 3.0, 2.0, 0.8  # extra_s: well above a step even on a loaded machine
    proc = torchrun(tmp_path, "steps=8", f"watchdog.limit_s={limit}", f"watchdog.grace_s={grace}",
                    "watchdog.straggler_steps=3",
                    env={"TESSERA_TEST_SLOW_RANK": "1", "TESSERA_TEST_SLOW_S": str(extra_s),
                         "TESSERA_TEST_HANG_RANK": "1", "TESSERA_TEST_HANG_AT_STEP": "4"})
    lines, hang_began = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step     4 "):  # step 4 (0-based: the fifth) begins now
            hang_began = time.monotonic()
    status = proc.wait(timeout=120)
    printed = "".join(lines)
    assert status != 0, printed
    assert hang_began is not None and time.monotonic() - hang_began < limit + grace + 15, printed
    assert "hang: rank 1 did not arrive; the other ranks waited at step 4" in printed
    assert printed.count("hang: ") == 1  # one message, not one per rank
    assert "rank 1: in step 4" in printed and "rank 0: in step 4" in printed
    assert "straggler: rank 1 took" in printed and "straggler: rank 0" not in printed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = [row["step_time_ranks"] for row in rows if "step_time_ranks" in row]
    assert len(times) == 4 and all(len(t) == 2 for t in times)
    # the injected sleep shows on rank 1 alone
    assert statistics.median(slow - fast for fast, slow in times) >= 0.9 * extra_s
