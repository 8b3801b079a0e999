"""One torchrun's worth of `parallel_scaling.py`'s model-parallel and pipeline-bubble runs
(launched by it; every process runs every job of the list in turn in one process group).

    python -m torch.distributed.run --standalone --nproc-per-node N \
        benchmarks/model_parallel_worker.py {model|bubble} JOBS_JSON STEPS BATCH SEQ

model: each job trains a debug model under one `parallel=@mesh(...)` plan. Step 0 warms up,
steps 1..COUNTED run under `CommCounter` (bytes by collective kind), the rest are timed
without it. Prints one `ROW {json}` per job on rank 0: per-rank bytes and calls per step,
per-rank step seconds and the losses.

bubble: each job trains the llama debug model under `parallel=@mesh(pp=P,schedule=S,
n_microbatches=m)`; every step's forward/backward runs inside `measure_bubble`, and every
stage action is traced (kind F / B_full / B_input / W, stage, micro-batch, wall and CPU
seconds, in the order the rank ran it), so the schedule can be replayed with the measured
action times and communication left out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from torch.distributed.pipelining.stage import _PipelineStageBase  # noqa: E402

import tessera.components.train.launch as launching  # noqa: E402
from benchmarks.comm_counter import CommCounter  # noqa: E402
from benchmarks.model_parallel_suites import recipe, run_args  # noqa: E402
from tessera.cli import resolve  # noqa: E402
from tessera.components.parallel.pipeline_schedule import PipelineRunner, measure_bubble  # noqa: E402
from tessera.components.parallel.process_group import leave_process_group  # noqa: E402
from tessera.components.train.step import StepRunner  # noqa: E402

launching.leave_process_group = lambda: None  # one process group for every job (see tests/test_comm_hooks.py)
COUNTED = 2  # steps counted under CommCounter (after one warm-up step)


def gathered(value: Any) -> list[Any]:
    """`value` from every process (rank order)."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def model_job(job: dict, steps: int, batch: int, seq: int) -> dict:
    config, _ = resolve(recipe(job["model"]), [*run_args(job["model"], steps, batch, seq), *job["plan"].split()])
    counter = CommCounter()
    seconds: list[float] = []
    original = StepRunner.run

    def run(self: StepRunner, state: Any) -> Any:
        if 1 <= state.step <= COUNTED:
            with counter:
                return original(self, state)
        start = time.perf_counter()
        outcome = original(self, state)
        if state.step > COUNTED:
            seconds.append(time.perf_counter() - start)
        return outcome

    StepRunner.run = run
    try:
        result = launching.launch(config)
    finally:
        StepRunner.run = original
    per_rank = gathered({"bytes": {k: v / COUNTED for k, v in counter.bytes.items()},
                         "calls": {k: v / COUNTED for k, v in counter.calls.items()},
                         "sent_all_gather": counter.sent_all_gather / COUNTED, "seconds": seconds})
    return {**job, "losses": result.losses, "ranks": per_rank}


def bubble_job(job: dict, steps: int, batch: int, seq: int) -> dict:
    config, _ = resolve(recipe("llama"), [*run_args("llama", steps, batch, seq), *job["plan"].split()])
    measured: list[dict] = []
    actions: dict[str, list[float]] = {}  # kind -> wall seconds of each action this step
    trace: list[list] = []  # this step's actions in the order run: [kind, stage, micro-batch, seconds]
    cpu = [0.0]  # this thread's CPU seconds inside the actions this step
    originals = {name: getattr(_PipelineStageBase, name)
                 for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")}
    original_fb = PipelineRunner.forward_backward

    def forward_backward(self: PipelineRunner, *args: Any, **kwargs: Any) -> Any:
        out: dict = {}
        actions.clear()
        trace.clear()
        cpu[0] = 0.0
        process_start = time.process_time()

        def step() -> None:
            out["terms"] = original_fb(self, *args, **kwargs)

        bubble = measure_bubble(self, step)
        measured.append({**bubble, "busy_cpu": cpu[0], "process_cpu": time.process_time() - process_start,
                         **{k: sum(v) / len(v) for k, v in actions.items()},
                         **{f"{k}_count": len(v) for k, v in actions.items()}, "trace": list(trace)})
        return out["terms"]

    def timed(name: str) -> Any:
        inner = originals[name]

        def action(self: Any, *args: Any, **kwargs: Any) -> Any:
            kind = {"forward_one_chunk": "F", "backward_weight_one_chunk": "W"}.get(name)
            if kind is None:
                kind = "B_full" if kwargs.get("full_backward", args[2] if len(args) > 2 else True) else "B_input"
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(self, *args, **kwargs)
            finally:
                cpu[0] += time.thread_time() - start_cpu
                seconds = time.perf_counter() - start
                actions.setdefault(kind, []).append(seconds)
                trace.append([kind, self.stage_index, int(args[0] if args else kwargs.get("fwd_chunk_id", kwargs.get(
                    "bwd_chunk_id", -1))), seconds])

        return action

    PipelineRunner.forward_backward = forward_backward
    for name in originals:
        setattr(_PipelineStageBase, name, timed(name))
    try:
        result = launching.launch(config)
    finally:
        PipelineRunner.forward_backward = original_fb
        for name, inner in originals.items():
            setattr(_PipelineStageBase, name, inner)
    return {**job, "losses": result.losses, "ranks": gathered(measured)}


def main() -> None:
    mode, jobs = sys.argv[1], json.loads(sys.argv[2])
    steps, batch, seq = (int(a) for a in sys.argv[3:6])
    for job in jobs:
        row = (model_job if mode == "model" else bubble_job)(job, steps, batch, seq)
        if os.environ.get("RANK", "0") == "0":
            print("ROW", json.dumps(row), flush=True)
    if "RANK" in os.environ:
        leave_process_group()


if __name__ == "__main__":
    main()
