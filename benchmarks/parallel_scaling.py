"""Parallel plans at 1, 2 and 4 CPU processes (gloo, 1 thread each), in three suites:

    python benchmarks/parallel_scaling.py [--suite data model bubble] [--steps 20] [--batch 8] [--seq 64]
                                          [--procs 1 2 4] [--repeats 3] [--out benchmarks/results]

data: data-parallel plans and communication hooks (below). model: the model-parallel plans
(tensor, pipeline and expert parallelism, alone and composed with data parallelism) on the
llama and DeepSeek debug models: tokens/s and bytes per step by collective kind, counted at
the dispatcher (`benchmarks/comm_counter.py`, which sees pipeline sends and expert all-to-alls
too), beside the planner's prediction. bubble: the measured pipeline bubble of GPipe, 1F1B,
interleaved 1F1B and DualPipeV at p=2 and m=2..8 against the closed forms and against the
schedule replayed with the measured action times. Both run `benchmarks/model_parallel_worker.py`
under torchrun; `benchmarks/model_parallel_suites.py` lists their jobs and says how their
rows are computed. Each suite writes its table (markdown) and raw rows (JSON) to `--out`.

The data suite:

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
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import model_parallel_suites as suites  # noqa: E402

ROOT = suites.ROOT
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
import tessera.components.train.launch as launching
from tessera.components.parallel.process_group import leave_process_group
from tessera.recipes.llama_pretrain import recipe
from tessera.cli import resolve

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
args = ["debug", f"batch_size={batch}", f"seq_len={seq}", "precision=@fp32", "compute.threads=1", "progress=None",
        "checkpoint=None", "metrics=None", "validation.batches=0", "model.layers[*].attention.dropout=0.0",
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


def data_suite(a: argparse.Namespace, script: Path) -> tuple[str, list[dict]]:
    """The data-parallel table (markdown) and its raw rows."""
    lines = ["| processes | plan | tokens/s | bytes/step (avg) | bytes/compressed step | vs all-reduce "
             "| loss (last 5) |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    raw = []
    for procs in a.procs:
        for row in run(procs, a.steps, a.batch, a.seq, script):
            raw.append({"procs": procs, **row})
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
            lines.append(f"| {procs} | {row['name']} | {tokens:,.0f} | {avg} | {compressed} | {ratio} | {loss:.3f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n", raw


def compositions_supported() -> bool:
    """Whether the mesh plan takes pipeline parallelism beside FSDP and expert parallelism
    beside DDP (the config invariants refuse them until they land)."""
    from tessera.cli import resolve
    from tessera.recipes.deepseek_pretrain import recipe

    try:
        for plan in ("@mesh(dp_shard=2,pp=2)", "@mesh(dp_replicate=2,ep=2)", "@mesh(pp=2,dp_shard=2,ep=2)"):
            resolve(recipe, ["debug", f"parallel={plan}"])
    except Exception:
        return False
    return True


def retable(folder: Path, a: argparse.Namespace) -> None:
    """Rewrite the model and bubble tables (markdown) of `folder` from its JSON rows: the
    lines above and below each table are kept, the table and the bubble summaries recomputed
    (and the planner's predictions, with `a.replan`)."""
    for name, rebuild in (
            ("parallel_scaling_model", lambda raw: suites.model_table(
                [suites.model_row(r["repeats"], r["procs"], a.batch, a.seq, r["planned"]) for r in raw])),
            ("parallel_scaling_bubble", lambda raw: suites.bubble_table(
                [suites.bubble_row(r["repeats"]) for r in raw]))):
        if not (folder / f"{name}.json").exists():
            continue
        data = json.loads((folder / f"{name}.json").read_text())
        for r in data["rows"]:
            if name.endswith("bubble"):
                r["summary"] = suites.bubble_row(r["repeats"])
            elif a.replan:
                r["planned"] = suites.planned(r["repeats"][0], r["procs"], a.steps, a.batch, a.seq)
        (folder / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")))
        lines = (folder / f"{name}.md").read_text().splitlines()
        table = [i for i, line in enumerate(lines) if line.startswith("|")]
        text = "\n".join(lines[:table[0]]) + "\n" + rebuild(data["rows"]) + "\n".join(lines[table[-1] + 1:]) + "\n"
        (folder / f"{name}.md").write_text(text)
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", choices=["data", "model", "bubble"], default=["data", "model", "bubble"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global sequences per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--bubble-steps", type=int, default=10)
    parser.add_argument("--bubble-batch", type=int, default=16)
    parser.add_argument("--bubble-seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="model and bubble suites: runs of every job")
    parser.add_argument("--retable", type=Path, default=None,
                        help="rebuild the model and bubble tables in this folder from its JSON rows, running nothing")
    parser.add_argument("--replan", action="store_true",
                        help="with --retable: recompute the planner's column with the planner as it is now")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--compositions", choices=["auto", "yes", "no"], default="auto",
                        help="model suite: FSDP x PP, PP x EP x DP and EP over DDP rows (auto: if the plan takes them)")
    a = parser.parse_args()
    if a.retable is not None:
        retable(a.retable, a)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {date.today().isoformat()}"
    print(f"{machine}; load average at start {os.getloadavg()[0]:.2f}\n", flush=True)

    def save(name: str, header: str, table: str, raw: list[dict]) -> None:
        load = f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}"
        (a.out / f"{name}.md").write_text(f"{machine}\n\n{header}\n\n{table}\n{load}\n")
        (a.out / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": raw}, separators=(",", ":")))
        print(f"{load}; wrote {a.out / name}.md and .json\n", flush=True)

    if "data" in a.suite:
        script = ROOT / "runs" / "parallel_scaling_worker.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(WORKER)
        header = (f"llama debug model, {a.steps} steps of {a.batch} x {a.seq} tokens, fp32, 1 thread per process; "
                  "data-parallel plans")
        print(header, flush=True)
        table, raw = data_suite(a, script)
        save("parallel_scaling_data", header, table, raw)
    loads: list[float] = []

    def repeat(r: int) -> None:
        loads.append(os.getloadavg()[0])
        print(f"repeat {r + 1} of {a.repeats} (load average {loads[-1]:.2f})", flush=True)

    if "model" in a.suite:
        header = (f"llama and DeepSeek debug models, {a.steps} steps of {a.batch} x {a.seq} tokens, fp32, 1 thread "
                  f"per process; tokens/s the median of {a.repeats} repeats; bytes per step in MB, busiest "
                  "process, measured (planner)")
        print(header, flush=True)
        compositions = a.compositions == "yes" or a.compositions == "auto" and compositions_supported()
        jobs = {procs: suites.model_jobs(procs, compositions) for procs in a.procs}
        runs: dict[tuple, list[dict]] = {}
        for r in range(a.repeats):
            repeat(r)
            for procs in a.procs:
                for row in suites.run_worker("model", procs, jobs[procs], a.steps, a.batch, a.seq):
                    runs.setdefault((procs, row["model"], row["name"]), []).append(row)
                    rate = suites.model_row([row], procs, a.batch, a.seq, {})["tokens_per_s"]
                    print(f"  {procs} {row['model']} {row['name']}: {rate:,.0f} tokens/s", flush=True)
        rows, raw = [], []
        for (procs, _, _), repeats in runs.items():
            plan = suites.planned(repeats[0], procs, a.steps, a.batch, a.seq)
            rows.append(suites.model_row(repeats, procs, a.batch, a.seq, plan))
            raw.append({"procs": procs, "planned": plan, "repeats": repeats})
        table = suites.model_table(rows)
        print(table, flush=True)
        save("parallel_scaling_model", f"{header}; load average at each repeat's start: "
             + ", ".join(f"{x:.1f}" for x in loads[-a.repeats:]), table, raw)
    if "bubble" in a.suite:
        header = (f"llama debug model, pp=2 on 2 processes, {a.bubble_steps} steps of {a.bubble_batch} x "
                  f"{a.bubble_seq} tokens (first {suites.BUBBLE_WARMUP} not measured), fp32, 1 thread per process, "
                  f"{a.repeats} repeats")
        print(header, flush=True)
        runs = {}
        for r in range(a.repeats):
            repeat(r)
            for row in suites.run_worker("bubble", 2, suites.bubble_jobs(2), a.bubble_steps, a.bubble_batch,
                                         a.bubble_seq):
                runs.setdefault((row["schedule"], row["m"]), []).append(row)
        rows = [suites.bubble_row(repeats) for repeats in runs.values()]
        table = suites.bubble_table(rows)
        print(table, flush=True)
        save("parallel_scaling_bubble", f"{header}; load average at each repeat's start: "
             + ", ".join(f"{x:.1f}" for x in loads[-a.repeats:]), table,
             [{"repeats": repeats, "summary": row} for repeats, row in zip(runs.values(), rows, strict=True)])


if __name__ == "__main__":
    main()
