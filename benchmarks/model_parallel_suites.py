"""The model-parallel and pipeline-bubble suites of `parallel_scaling.py`: which plans run at
each process count, how a torchrun of `model_parallel_worker.py` is launched, and how its rows
become the README's tables.

Model suite. tokens/s: the global batch's tokens over the median step time, where a step's
time is the slowest process's (model build, warm-up step and the counted steps excluded),
the median over `--repeats` runs of the whole suite (spread over minutes, so that a burst of
other load moves one sample, not a row).
Bytes per step: the busiest process's, by collective kind, counted at the dispatcher
(`comm_counter.CommCounter`, planner's convention: all-gather at its gathered output,
all-to-all at the rows leaving the process, point-to-point at what the process sends),
averaged over the counted steps; the planner's prediction for the same config
(`tessera.components.train.comm_volume.per_step` through `per_rank_report`) in parentheses.

Bubble suite. Each process's idle share of a step, 1 - busy / wall
(`tessera.components.parallel.pipeline_schedule.measure_bubble`), the median over the measured
steps in which every rank had its core (below), against the closed form
`tessera.components.train.pipeline_bubble.bubble_fraction` (for DualPipeV also with the measured F, B
and W put in), and against `replay`: the schedule's own action order as each rank ran it,
replayed with each stage's mean measured action times and free communication. The closed
forms assume equal stages; the replay keeps the stages' real costs (the last one holds the
head and the loss) and the schedule's real shape at this m, so measured minus replayed is
what communication, scheduling overhead and waiting for a core added.

On a shared machine other processes take the cores now and then. The "CPU share" column is
the actions' thread CPU time over their wall time: below 1 the process waited for a core
inside its compute, and busy-vs-wall measured contention, not the schedule. Steps where any
rank's share fell below `UNCONTENDED` are left out of the idle shares and action times
("steps kept").

The bubble runs at p=2 only: with one core per process an idle rank's wait is the
schedule's. At p=4 on 2 cores, two ranks share each core, a rank waiting on its neighbour
sleeps and hands its core to another, and busy-vs-wall then measures how the OS shares the
cores (a rank's compute stretches whenever others are busy) rather than the bubble.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tessera.components.train.pipeline_bubble import bubble_fraction

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "model_parallel_worker.py"
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "point-to-point", "broadcast")
BUBBLE_WARMUP = 2  # steps of each bubble job not measured
UNCONTENDED = 0.9  # a step counts when every rank's actions got this share of a core


def run_args(model: str, steps: int, batch: int, seq: int) -> list[str]:
    """Command-line overrides every run of `model` ("llama" or "deepseek") shares."""
    extra = ["model.layers[*].attention.dropout=0.0"] if model == "llama" else []
    return ["debug", f"batch_size={batch}", f"seq_len={seq}", "precision=@fp32", "compute.threads=1", "progress=None",
            "checkpoint=None", "metrics=None", "validation.batches=1", f"scheduler.warmup_steps={min(5, steps)}",
            f"steps={steps}", f"scheduler.total_steps={steps}", *extra]


def recipe(model: str):
    from tessera.recipes import deepseek_pretrain, llama_pretrain

    return {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}[model]


def _pp(p: int, schedule: str, m: int, extra: str = "") -> str:
    return f"parallel=@mesh(pp={p},schedule='{schedule}',n_microbatches={m}{extra})"


def model_jobs(procs: int, compositions: bool) -> list[dict]:
    """The model-parallel plans that run on `procs` processes, plus an FSDP reference row per
    model. `compositions`: also PP and EP composed with data parallelism."""
    def job(model: str, name: str, plan: str) -> dict:
        return {"model": model, "name": name, "plan": plan}

    if procs == 1:
        return [job(m, "single", "parallel=@single") for m in ("llama", "deepseek")]
    jobs = []
    if procs == 2:
        for model in ("llama", "deepseek"):
            jobs += [job(model, "fsdp (reference)", "parallel=@mesh(dp_shard=2)"),
                     job(model, "tp=2", "parallel=@mesh(tp=2)"),
                     job(model, "pp=2 GPipe m=4", _pp(2, "GPipe", 4)),
                     job(model, "pp=2 1F1B m=4", _pp(2, "1F1B", 4)),
                     job(model, "pp=2 Interleaved1F1B v=2 m=4", _pp(2, "Interleaved1F1B", 4, ",virtual_stages=2")),
                     job(model, "pp=2 DualPipeV m=4", _pp(2, "DualPipeV", 4))]
        jobs.append(job("deepseek", "dp_shard=2,ep=2", "parallel=@mesh(dp_shard=2,ep=2)"))
        if compositions:
            # the plain loop: fused AdamW takes no mix of plain (DDP) and DTensor (expert) parameters
            jobs.append(job("deepseek", "dp_replicate=2,ep=2 (EP over DDP), unfused AdamW",
                            "parallel=@mesh(dp_replicate=2,ep=2) optimizer.fused=False"))
    if procs == 4:
        for model in ("llama", "deepseek"):
            jobs += [job(model, "fsdp (reference)", "parallel=@mesh(dp_shard=4)"),
                     job(model, "dp_shard=2,tp=2", "parallel=@mesh(dp_shard=2,tp=2)"),
                     job(model, "pp=4 GPipe m=4", _pp(4, "GPipe", 4)),
                     job(model, "pp=4 1F1B m=4", _pp(4, "1F1B", 4))]
        jobs += [job("deepseek", "dp_shard=4,ep=2", "parallel=@mesh(dp_shard=4,ep=2)"),
                 job("deepseek", "dp_shard=4,ep=4", "parallel=@mesh(dp_shard=4,ep=4)")]
        if compositions:
            for model in ("llama", "deepseek"):
                jobs += [job(model, "dp_shard=2,pp=2 m=2 (FSDP x PP)",
                             "parallel=@mesh(dp_shard=2,pp=2,n_microbatches=2)"),
                         job(model, "tp=2,pp=2 m=4 (TP x PP)", "parallel=@mesh(tp=2,pp=2,n_microbatches=4)")]
            jobs += [job("deepseek", "dp_replicate=4,ep=2,zero1 (EP over ZeRO-1)",
                         "parallel=@mesh(dp_replicate=4,ep=2,zero1=True)"),
                     job("deepseek", "dp_shard=2,pp=2,ep=2 m=2 (PP x EP x FSDP)",
                         "parallel=@mesh(dp_shard=2,pp=2,ep=2,n_microbatches=2)"),
                     job("deepseek", "dp_replicate=2,pp=2,ep=2,zero1 m=2 (V3 in miniature)",
                         "parallel=@mesh(dp_replicate=2,pp=2,ep=2,zero1=True,n_microbatches=2)")]
    return jobs


def planned(job: dict, procs: int, steps: int, batch: int, seq: int) -> dict[str, float]:
    """The dry run's communication per step (busiest rank, bytes by kind) for `job` on `procs`
    processes: `per_rank_report`, the numbers `--dry-run` prints."""
    import io

    from rich.console import Console

    from tessera.cli import resolve
    from tessera.components.train.dry_run import per_rank_report
    from tessera.components.train.launch import build_model_on_meta

    config, _ = resolve(recipe(job["model"]), [*run_args(job["model"], steps, batch, seq), *job["plan"].split()])
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(procs)
    try:
        report = per_rank_report(config, build_model_on_meta(config.model), console=Console(file=io.StringIO()))
    finally:
        if before is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = before
    return dict(report["communication"])


def bubble_jobs(p: int = 2) -> list[dict]:
    """Pipeline schedules x micro-batch counts on the llama debug model at `p` stages per pipeline."""
    jobs = []
    for schedule, ms, extra in (("GPipe", (2, 4, 8), ""), ("1F1B", (2, 4, 8), ""),
                                ("Interleaved1F1B", (2, 4, 8), ",virtual_stages=2"), ("DualPipeV", (4, 8), "")):
        for m in ms:
            jobs.append({"schedule": schedule, "p": p, "m": m, "v": 2 if extra else 1,
                         "plan": _pp(p, schedule, m, extra)})
    return jobs


def run_worker(mode: str, procs: int, jobs: list[dict], steps: int, batch: int, seq: int) -> list[dict]:
    """Launch `model_parallel_worker.py` on `procs` processes and return its rows."""
    command = [sys.executable, str(WORKER), mode, json.dumps(jobs), str(steps), str(batch), str(seq)]
    if procs > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    done = subprocess.run(command, text=True, capture_output=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode:
        failed = jobs[len(rows)]
        errors = [line for line in done.stderr.splitlines() if "Warning" not in line and "warn" not in line]
        first = next((i for i, line in enumerate(errors) if "Traceback" in line), max(0, len(errors) - 60))
        sys.exit(f"{mode}: {procs} process(es) failed at {failed} ({len(rows)} jobs done):\n"
                 + "\n".join(errors[first:first + 60]))
    return rows


# -- tables ------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def model_row(repeats: list[dict], procs: int, batch: int, seq: int, planned: dict[str, float]) -> dict:
    """One plan's rows (one per repeat of the suite) reduced to what the table shows: tokens/s
    the median over the repeats, bytes and losses from the first (they repeat exactly, bar
    the routing of ties); `planned`: the planner's bytes."""
    rates = []
    for row in repeats:
        steps = [max(times) for times in zip(*(r["seconds"] for r in row["ranks"]), strict=True)]
        rates.append(batch * seq / statistics.median(steps))
    ranks, row = repeats[0]["ranks"], repeats[0]
    measured = {k: max(r["bytes"].get(k, 0.0) for r in ranks) for k in (*KINDS, "other")}
    total = max(sum(r["bytes"].values()) for r in ranks)
    return {"procs": procs, "model": row["model"], "plan": row["name"], "tokens_per_s": statistics.median(rates),
            "tokens_per_s_repeats": rates, "measured": measured, "measured_total": total, "planned": planned,
            "planned_total": sum(planned.values()), "loss": sum(row["losses"][-5:]) / len(row["losses"][-5:])}


def model_table(rows: list[dict]) -> str:
    head = ("| processes | model | plan | tokens/s | all-reduce | all-gather | reduce-scatter | all-to-all "
            "| point-to-point | broadcast | total | loss (last 5) |\n" + "|---" * 12 + "|\n")
    lines = []
    for r in rows:
        cells = []
        for kind in KINDS:
            got, want = r["measured"][kind], r["planned"].get(kind, 0.0)
            cells.append("–" if not got and not want else f"{_mb(got)} ({_mb(want)})" if kind != "broadcast"
                         else _mb(got))
        total = f"{_mb(r['measured_total'])} ({_mb(r['planned_total'])})"
        tokens = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/c"
        lines.append(f"| {r['procs']} | {r['model']} | {r['plan']} | {tokens} | {' | '.join(cells)} | {total} "
                     f"| {r['loss']:.3f} |")
    return head + "\n".join(lines) + "\n"


def _schedule_key(schedule: str) -> str:
    return {"GPipe": "gpipe", "1F1B": "1f1b", "Interleaved1F1B": "interleaved_1f1b", "DualPipeV": "dualpipev"}[schedule]


def replay(orders: list[list[tuple[str, int, int]]], seconds: dict[tuple[str, int], float]) -> list[float]:
    """Idle share per rank of a pipeline step whose ranks run the actions `orders[r]` ((kind,
    stage, micro-batch) in the order rank r ran them) taking `seconds[(kind, stage)]` each,
    with communication free: an action starts when its rank is free and its inputs exist (a
    forward after the previous stage's forward of that micro-batch; a backward after its own
    forward and the next stage's backward; a weight gradient after its input gradient)."""
    n_stages = 1 + max(stage for order in orders for _, stage, _ in order)
    finished: dict[tuple[str, int, int], float] = {}
    free, busy, at = [0.0] * len(orders), [0.0] * len(orders), [0] * len(orders)
    while any(at[r] < len(order) for r, order in enumerate(orders)):
        moved = False
        for r, order in enumerate(orders):
            while at[r] < len(order):
                kind, stage, mb = order[at[r]]
                needs = {"F": [("F", stage - 1, mb)] if stage else [],
                         "W": [("B", stage, mb)]}.get(kind, [("F", stage, mb)] + (
                             [("B", stage + 1, mb)] if stage < n_stages - 1 else []))
                if any(need not in finished for need in needs):
                    break
                free[r] = max([free[r]] + [finished[need] for need in needs]) + seconds[(kind, stage)]
                busy[r] += seconds[(kind, stage)]
                finished[("B" if kind.startswith("B") else kind, stage, mb)] = free[r]
                at[r] += 1
                moved = True
        if not moved:
            raise RuntimeError("replay: the traced orders wait on each other")
    return [1 - b / max(free) for b in busy]


def _uncontended(row: dict) -> list[int]:
    """Indices of `row`'s measured steps in which every rank ran its actions with its core to
    itself: thread CPU time at least `UNCONTENDED` of the actions' wall time."""
    steps = range(BUBBLE_WARMUP, len(row["ranks"][0]))
    return [i for i in steps if all(r[i]["busy_cpu"] >= UNCONTENDED * r[i]["busy"] for r in row["ranks"])]


def bubble_row(repeats: list[dict]) -> dict:
    """One schedule x m's rows (one per repeat) reduced to: per rank, the median idle share
    over the uncontended measured steps of all repeats (all measured steps when none is), the
    mean action times, the CPU share of the action wall time over all measured steps; the
    closed form; the schedule replayed with the mean action times."""
    kept = [(row, _uncontended(row)) for row in repeats]
    n_kept = sum(len(ix) for _, ix in kept)
    if not n_kept:
        kept = [(row, list(range(BUBBLE_WARMUP, len(row["ranks"][0])))) for row in repeats]
    spans: dict[tuple[str, int], list[float]] = {}
    for row, ix in kept:
        for steps in row["ranks"]:
            for i in ix:
                for kind, stage, _, seconds in steps[i]["trace"]:
                    spans.setdefault((kind, stage), []).append(seconds)
    action_seconds = {key: statistics.mean(values) for key, values in spans.items()}
    orders = [[(kind, stage, mb) for kind, stage, mb, _ in steps[-1]["trace"]] for steps in repeats[0]["ranks"]]
    replayed = replay(orders, action_seconds)
    ranks = []
    for rank in range(len(repeats[0]["ranks"])):
        mine = [row["ranks"][rank][i] for row, ix in kept for i in ix]
        measured = [s for row in repeats for s in row["ranks"][rank][BUBBLE_WARMUP:]]
        mean = {k: statistics.mean(s[k] for s in mine) for k in ("F", "B_full", "B_input", "W") if k in mine[0]}
        ranks.append({"idle": statistics.median(s["bubble"] for s in mine),
                      "wall": statistics.median(s["wall"] for s in mine),
                      "cpu_share": sum(s["busy_cpu"] for s in measured) / sum(s["busy"] for s in measured), **mean})
    row = repeats[0]
    schedule, p, m, v = row["schedule"], row["p"], row["m"], row["v"]
    closed = bubble_fraction(_schedule_key(schedule), p=p, m=m, v=v)
    formula = None
    if schedule == "DualPipeV":  # the paper's formula with this run's F, B (full) and W put in
        f = statistics.mean(r["F"] for r in ranks)
        w = statistics.mean(r.get("W", 0.0) for r in ranks)
        full = statistics.mean(r.get("B_full", r.get("B_input", 0.0) + w) for r in ranks)
        formula = {"bubble": bubble_fraction("dualpipev", p=p, m=m, f=f, b=full, w=w), "F": f, "B": full, "W": w}
    return {"schedule": schedule, "p": p, "m": m, "v": v, "repeats": len(repeats), "ranks": ranks,
            "steps_kept": n_kept, "steps_measured": sum(len(r["ranks"][0]) - BUBBLE_WARMUP for r in repeats),
            "closed_form": closed, "replayed": replayed, "formula_with_measured_times": formula,
            "action_seconds": {f"{k}{s}": v for (k, s), v in sorted(action_seconds.items())}}


def bubble_table(rows: list[dict]) -> str:
    head = ("| schedule | p | m | idle share measured, rank 0 / rank 1 | closed form | schedule replayed with the "
            "measured action times, no communication "
            "| F / B / W per action, ms, rank 0; rank 1 | CPU share in actions, all steps | steps kept "
            "| step wall, ms |\n" + "|---" * 10 + "|\n")
    lines = []

    def ms(x: dict, k: str) -> str:
        return f"{x[k] * 1e3:.1f}" if k in x else "–"

    for r in rows:
        idle = " / ".join(f"{x['idle']:.1%}" for x in r["ranks"])
        times = "; ".join(f"{ms(x, 'F')} / {ms(x, 'B_full') if 'B_full' in x else ms(x, 'B_input')} / {ms(x, 'W')}"
                          for x in r["ranks"])
        share = " / ".join(f"{x['cpu_share']:.2f}" for x in r["ranks"])
        share += f" | {r['steps_kept']} of {r['steps_measured']}"
        name = r["schedule"] + (f" (v={r['v']})" if r["v"] > 1 else "")
        wall = statistics.median(x["wall"] for x in r["ranks"]) * 1e3
        closed = f"{r['closed_form']:.1%}"
        if r["formula_with_measured_times"]:
            closed += f"; {r['formula_with_measured_times']['bubble']:.1%} with measured F, B, W"
        replayed = " / ".join(f"{x:.1%}" for x in r["replayed"])
        lines.append(f"| {name} | {r['p']} | {r['m']} | {idle} | {closed} | {replayed} | {times} | {share} "
                     f"| {wall:.0f} |")
    return head + "\n".join(lines) + "\n"
