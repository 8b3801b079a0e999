"""`metrics.profile=START:STOP`: a 4-step run of the llama debug recipe profiled over steps 2
to 3 writes a Chrome trace (JSON, checked with the json module) holding those steps' spans
and the ops they ran, and none of the steps outside; a malformed range is a config fault."""

from __future__ import annotations

import json

import pytest

from tessera.components.train.profiling import parse_steps

from helpers.launch import own_traceback_frames, run_recipe

ARGS = ["steps=4", "batch_size=2", "seq_len=32", "compute.threads=1", "scheduler.warmup_steps=1",
        "checkpoint=None", "metrics.plots=False", "metrics.tensorboard=False"]


@pytest.mark.slow  # one recipe run: about 10 s alone
def test_profiled_steps_write_a_trace_with_their_ops(tmp_path):
    # fresh: the profiler's exit-time teardown runs in the interpreter's finalization
    done = run_recipe(*ARGS, f"metrics.folder={tmp_path}", "metrics.profile=2:3", fresh=True)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = tmp_path / "trace-steps-2-3.json"
    assert f"profile: wrote {trace}" in done.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= names and not {"step 1", "step 4"} & names
    assert any(str(n).startswith("aten::mm") or str(n) == "aten::addmm" for n in names)  # the model's matmuls
    assert any(str(n).startswith("autograd::engine") for n in names)                     # and the backward


def test_profile_range_is_parsed_and_bad_ranges_are_refused():
    assert parse_steps("2:3") == (2, 3) and parse_steps("5") == (5, 5) and parse_steps(None) is None
    for bad in ("3:2", "0:1", "a:b"):
        with pytest.raises(ValueError, match="metrics.profile"):
            parse_steps(bad)


@pytest.mark.slow  # a recipe start-up: a few seconds alone, 20 s on a busy machine
def test_bad_profile_range_is_a_config_fault_not_a_traceback(tmp_path):
    done = run_recipe(*ARGS, f"metrics.folder={tmp_path}", "metrics.profile=3:1", "--print")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "metrics:" in done.stderr and "profile='3:1'" in done.stderr and "metrics.profile=3:5" in done.stderr
    assert own_traceback_frames(done.stderr) == []
