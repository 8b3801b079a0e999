"""Data-parallel plans and communication hooks at 1, 2 and 4 CPU processes (gloo, 1 thread
each): tokens/s, communication bytes per step, bytes relative to plain all-reduce, and the
loss after the same budget.

    python benchmarks/parallel_scaling.py [--steps 20] [--batch 8] [--seq 64] [--procs 1 2 4]

Every run trains the llama debug model (fp32, dropout 0) for `--steps` steps on a global
batch of `--batch` sequences of `--seq` tokens, through `parallel=@mesh(...)`, all runs of one
process count inside one torchrun. Loss: the mean of the last 5 steps' losses (over the whole
batch). tokens/s: global tokens over the wall time of the whole `launch` (model build and mesh
setup included, about a second). Bytes per step: what each process handed to collectives,
counted inside the hook or periodic sync (averaged over the run, uncompressed warmup steps
included; the "compressed step" column excludes them). For the plans without a counter of
their own, the worker counts what the process hands to torch.distributed's Python
collectives (FSDP2's all-gathers and reduce-scatters, HSDP's replica all-reduce, ZeRO-1's
parameter broadcasts: the input tensor, and a broadcast only on its source); DDP's own
gradient all-reduce runs inside its C++ reducer, so DDP and ZeRO-1 add its nominal payload,
the full fp32 gradient per step. With more processes than cores the times measure
contention as much as communication.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5  # uncompressed steps of powersgd / one_bit (the lr warmup)


def plans(procs: int) -> dict[str, str]:
    """Name -> command-line overrides of every plan that runs on `procs` processes."""
    if procs == 1:
        return {"single": "parallel=@single"}
    mesh = f"parallel=@mesh(dp_replicate={procs})"
    table = {
        "ddp (all-reduce)": mesh,
        "ddp + fp16": f"{mesh} parallel.comm_hook=@fp16",
        "ddp + powersgd r=4": f"{mesh} parallel.comm_hook=@powersgd parallel.comm_hook.rank=4 "
                              f"parallel.comm_hook.start_iter={WARMUP}",
        "ddp + one_bit": f"{mesh} parallel.comm_hook=@one_bit parallel.comm_hook.warmup_steps={WARMUP}",
        "diloco H=5": f"{mesh} parallel.periodic_sync=@diloco parallel.periodic_sync.inner_steps=5",
        "local_sgd H=5": f"{mesh} parallel.periodic_sync=@local_sgd parallel.periodic_sync.inner_steps=5",
        "zero1": f"parallel=@mesh(dp_replicate={procs},zero1=True)",
        "fsdp": f"parallel=@mesh(dp_shard={procs})",
    }
    if procs == 4:
        table["hsdp 2x2"] = "parallel=@mesh(dp_replicate=2,dp_shard=2)"
    return table


WORKER = r'''
import json, os, sys, time
import fiddle as fdl
import components.train.launch as launching
from components.parallel.process_group import leave_process_group
from recipes.llama_pretrain import recipe
from registry.cli import resolve

launching.leave_process_group = lambda: None  # one process group for all runs (see tests/test_comm_hooks.py)
import torch.distributed as dist

SENT = [0]


def _count(name, size):
    """Wrap torch.distributed.<name> so that each call adds size(*args, **kwargs) bytes to SENT."""
    call = getattr(dist, name)

    def counted(*args, **kwargs):
        SENT[0] += size(*args, **kwargs)
        return call(*args, **kwargs)

    setattr(dist, name, counted)


def _nbytes(t):
    return t.numel() * t.element_size()


_count("all_gather_single", lambda output_tensor, input_tensor, *a, **k: _nbytes(input_tensor))
_count("reduce_scatter_single", lambda *a, **k: _nbytes(k["input"] if "input" in k else a[1]))
_count("all_reduce", lambda tensor, *a, **k: _nbytes(tensor))
_count("broadcast", lambda tensor, src=None, *a, **k: _nbytes(tensor) if src == dist.get_rank() else 0)
steps, batch, seq = (int(a) for a in sys.argv[1:4])
args = ["debug", f"batch_size={batch}", f"seq_len={seq}", "precision=@fp32", "threads=1", "progress=False",
        "checkpoint=None", "metrics=None", "eval_batches=0", "model.layers[*].attention.dropout=0.0",
        "scheduler.warmup_steps=5", f"steps={steps}", f"scheduler.total_steps={steps}"]
for name, plan in json.loads(sys.argv[4]).items():
    config, _ = resolve(recipe, [*args, *plan.split()])
    counter = None
    for slot in ("comm_hook", "periodic_sync"):
        if getattr(config.parallel, slot, None) is not None:
            counter = fdl.build(getattr(config.parallel, slot))
            setattr(config.parallel, slot, counter)
    SENT[0] = 0
    start = time.perf_counter()
    result = launching.launch(config)
    seconds = time.perf_counter() - start
    python_bytes = SENT[0]
    if os.environ.get("RANK", "0") == "0":
        print("ROW", json.dumps({"name": name, "losses": result.losses, "seconds": seconds,
                                 "bytes": getattr(counter, "bytes_sent", None), "python_bytes": python_bytes,
                                 "param_bytes": sum(p.numel() * 4 for p in result.model.parameters())}), flush=True)
if "RANK" in os.environ:
    leave_process_group()
'''


def run(procs: int, steps: int, batch: int, seq: int, script: Path) -> list[dict]:
    command = [sys.executable, str(script), str(steps), str(batch), str(seq), json.dumps(plans(procs))]
    if procs > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    done = subprocess.run(command, text=True, capture_output=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if done.returncode:
        sys.exit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    return [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], text=True, capture_output=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global sequences per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    a = parser.parse_args()
    script = ROOT / "runs" / "parallel_scaling_worker.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(WORKER)
    print(f"{cpu_name()}, {os.cpu_count()} cores; llama debug model, {a.steps} steps of {a.batch} x {a.seq} "
          f"tokens, fp32, 1 thread per process\n")
    print("| processes | plan | tokens/s | bytes/step (avg) | bytes/compressed step | vs all-reduce | loss (last 5) |")
    print("|---|---|---|---|---|---|---|")
    for procs in a.procs:
        for row in run(procs, a.steps, a.batch, a.seq, script):
            full = row["param_bytes"]
            tokens = a.steps * a.batch * a.seq / row["seconds"]
            loss = sum(row["losses"][-5:]) / 5
            sent = row["bytes"]
            if row["name"].startswith(("ddp (all-reduce)", "zero1")):
                # DDP's reducer (C++) hands the whole fp32 gradient to all-reduce each step
                sent = full * a.steps + (row["python_bytes"] if row["name"].startswith("zero1") else 0)
            elif sent is None and procs > 1:
                sent = row["python_bytes"]
            if sent is None:
                avg = compressed = ratio = "n/c"
            else:
                warm = WARMUP if any(k in row["name"] for k in ("powersgd", "one_bit")) else 0
                per_step = sent / a.steps
                per_compressed = (sent - warm * full) / (a.steps - warm)
                avg, compressed = f"{per_step / 1e6:.2f} MB", f"{per_compressed / 1e6:.3f} MB"
                ratio = f"1/{full / per_compressed:.1f}" if per_compressed else "0"
            print(f"| {procs} | {row['name']} | {tokens:,.0f} | {avg} | {compressed} | {ratio} | {loss:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
