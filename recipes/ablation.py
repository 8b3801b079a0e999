"""Architecture ablation: attention x position encoding x feed-forward, every cell at the same
parameter or FLOP budget and trained on the same tokens of the default corpus.

    python recipes/ablation.py --quick --out runs/ablation_quick      # a handful of cells, seconds
    python recipes/ablation.py --match flops --out runs/ablation      # the whole grid
    python recipes/ablation.py --match flops --attention mha --position rope --feed-forward swiglu,moe --seeds 3

Axes: attention mha, gqa, mla, block_sparse, linear, sliding_window; position rope, alibi, nope;
feed-forward swiglu, mlp (GELU), moe (DeepSeekMoE: fine-grained routed experts plus a shared
expert, arXiv:2401.06066 §3). The reference cell mha/rope/swiglu sets the budget; every other
cell gets the feed-forward width (for MoE the expert width) that meets it within --tolerance
(see components/ablation/cells.py for what is counted). Combinations the components reject
at validation are listed as skipped with the validator's reason.

Each cell trains in its own process, forked from a server that has imported torch and the
components but holds no data or model, so a cell's peak memory is its own: on CPU the
process's peak resident set (ru_maxrss, which includes the ~0.4 GB of the Python/torch
runtime; the increase over the process's resident set at its start is shown too), on CUDA
torch.cuda.max_memory_allocated. Precision is fp32 unless --precision says otherwise, so the
numbers do not depend on whether the machine runs bf16 fast.

Writes OUT/ablation.md (the table, the budget, the skipped cells and, where both exist, MoE
against SwiGLU), OUT/ablation.png and OUT/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tessera.components.ablation.cells import (
    ATTENTIONS,
    FEED_FORWARDS,
    POSITIONS,
    REFERENCE,
    Cell,
    Scale,
    Size,
    faults,
    fit,
    ignored_position,
    run_config,
    size,
    skip_reason,
)
from tessera.components.precision.probe import cpu_model

# dim 128, 2 layers, 4 heads: about 1M parameters (half of them embedding and head), 409,600
# tokens per cell, sized so the whole grid (36 cells train) runs in 20-25 minutes on one thread
# of a 2-core x86 CPU (24.7 min measured on a shared AMD EPYC).
FULL = Scale(dim=128, n_layers=2, n_heads=4, reference_hidden=384, seq_len=128, batch_size=16, steps=200,
             warmup_steps=20)
# --quick: seconds per cell, enough to show every column is produced.
QUICK = Scale(dim=64, n_layers=1, n_heads=4, reference_hidden=192, seq_len=64, batch_size=4, steps=6,
              warmup_steps=1)
QUICK_CELLS = [Cell("mha", "rope", "swiglu"), Cell("mha", "rope", "moe"), Cell("gqa", "alibi", "mlp"),
               Cell("linear", "nope", "swiglu"), Cell("mla", "alibi", "swiglu"), Cell("linear", "rope", "swiglu"),
               Cell("block_sparse", "alibi", "mlp")]
VALIDATION_BATCHES = {"full": 32, "quick": 2}  # validation batches of batch_size x seq_len tokens


@dataclasses.dataclass
class Planned:
    """A cell that validated and met the budget, with its size."""

    cell: Cell
    size: Size
    deviation: float  # matched quantity / reference's - 1


def _parse_axis(value: str | None, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if value is None:
        return allowed
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--match", choices=("params", "flops"), default="flops",
                        help="budget every cell matches: block parameters or block training FLOPs/token")
    parser.add_argument("--quick", action="store_true", help="a handful of tiny cells (tests, a first look)")
    parser.add_argument("--seeds", type=int, default=1, help="train every cell with seeds 0..N-1")
    parser.add_argument("--out", default="runs/ablation", help="folder for ablation.md, ablation.png, results.json")
    parser.add_argument("--attention", help=f"comma list of {', '.join(ATTENTIONS)} (default all)")
    parser.add_argument("--position", help=f"comma list of {', '.join(POSITIONS)} (default all)")
    parser.add_argument("--feed-forward", help=f"comma list of {', '.join(FEED_FORWARDS)} (default all)")
    parser.add_argument("--steps", type=int, help="optimizer steps per cell (default: the scale's)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="allowed budget miss, a fraction")
    parser.add_argument("--precision", default="fp32", help="PRECISION registry name (default fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch threads per cell (default: torch's)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def _plan(cells: list[Cell], scale: Scale, match: str, tolerance: float) -> tuple[list[Planned], dict[str, str], Size]:
    """Validate every cell and fit it to the reference's budget; the rest are skipped with a reason."""
    reference = size(Cell(*REFERENCE), scale.reference_hidden, scale)
    target = reference.matched(match)
    planned, skipped = [], {}
    for cell in cells:
        found = faults(cell, scale)
        if found:
            skipped[cell.name] = f"invalid: {skip_reason(found)}"
            continue
        ignored = ignored_position(cell, scale)
        if ignored:
            skipped[cell.name] = f"not applied: {ignored}"
            continue
        try:
            fitted = fit(cell, scale, match=match, target=target, tolerance=tolerance)
        except ValueError as err:
            skipped[cell.name] = f"budget: {err}"
            continue
        planned.append(Planned(cell, fitted, fitted.matched(match) / target - 1))
    return planned, skipped, reference


def _rss_mib() -> float:
    """This process's resident set now (Linux /proc; 0 where it is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cell_worker(payload: dict[str, Any], conn: Any) -> None:
    """Train one cell in this (forked) process and send back what it measured."""
    try:
        import torch

        from tessera.components.train.launch import launch

        start_rss = _rss_mib()
        scale = Scale(**payload["scale"])
        config = run_config(Cell(*payload["cell"]), payload["hidden"], scale, seed=payload["seed"],
                            precision=payload["precision"], device=payload["device"], threads=payload["threads"],
                            validation_batches=payload["validation_batches"])
        result = launch(config)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        cuda = payload["device"].startswith("cuda")
        conn.send({"ok": True, "val_loss": result.val_loss,
                   "val_bpb": result.val_loss / math.log(2) / payload["bytes_per_token"],
                   "final_loss": result.losses[-1], "tokens_per_second": result.tokens_per_second,
                   "seconds": result.seconds,
                   "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak,
                   "start_mib": 0.0 if cuda else start_rss})
    except BaseException as err:  # reported as a failed cell, with the reason, by the parent
        conn.send({"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
    finally:
        conn.close()


def _run_cell(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    receive, send = ctx.Pipe(duplex=False)
    from tessera.recipes import ablation  # the worker by its importable name (this file may be __main__)

    process = ctx.Process(target=ablation._cell_worker, args=(payload, send))
    process.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:
        message = {"ok": False, "error": "the cell's process died without a result"}
    process.join()
    if process.exitcode and message.get("ok"):
        message = {"ok": False, "error": f"the cell's process exited with code {process.exitcode}"}
    return message


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.3f}M"


def _fmt_bpb(summary: dict[str, float], n: int) -> str:
    if n == 1:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {summary['std']:.4f}"


def _table(rows: list[dict[str, Any]], match: str, seeds: int) -> list[str]:
    head = ["attention", "position", "feed-forward", "FFN width", "params total", "params activated",
            "train FLOPs/token", f"{match} vs budget", "val bits/byte" + (f" (mean ± sd, {seeds} seeds)" if seeds > 1
                                                                         else ""),
            "tokens/s", "peak memory MiB", "memory over start MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["attention"], row["position"], row["feed_forward"], str(row["hidden"]),
            _fmt_count(row["params_total"]), _fmt_count(row["params_activated"]),
            f"{row['flops_per_token'] / 1e6:.3f}M", f"{row['deviation']:+.2%}",
            _fmt_bpb(row["val_bpb"], len(row["seeds"])), f"{row['tokens_per_second']['mean']:,.0f}",
            f"{row['peak_mib']:.0f}", f"{row['over_start_mib']:.0f}"]) + " |")
    return lines


def _moe_comparison(rows: list[dict[str, Any]]) -> list[str]:
    """MoE against SwiGLU for every attention/position pair that has both, paired by seed."""
    by_key = {(r["attention"], r["position"], r["feed_forward"]): r for r in rows}
    lines = []
    for (attention, position, ffn), moe in by_key.items():
        dense = by_key.get((attention, position, "swiglu"))
        if ffn != "moe" or dense is None:
            continue
        seeds = sorted(set(moe["per_seed"]) & set(dense["per_seed"]))
        diffs = [moe["per_seed"][s] - dense["per_seed"][s] for s in seeds]
        spread = f" ± {statistics.stdev(diffs):.4f} (sd over {len(diffs)} seeds)" if len(diffs) > 1 else " (1 seed)"
        wins = sum(d < 0 for d in diffs)
        lines.append(f"- {attention}/{position}: MoE − SwiGLU val bits/byte = {statistics.fmean(diffs):+.4f}{spread}; "
                     f"MoE lower in {wins} of {len(diffs)} seeds (MoE {_fmt_bpb(moe['val_bpb'], len(seeds))}, "
                     f"SwiGLU {_fmt_bpb(dense['val_bpb'], len(seeds))})")
    return lines


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['attention']}/{r['position']}/{r['feed_forward']}" for r in rows]
    colors = {"swiglu": "tab:blue", "mlp": "tab:orange", "moe": "tab:green"}
    color = [colors[r["feed_forward"]] for r in rows]
    y = list(range(len(rows)))
    panels = [
        ("val bits/byte (lower is better)", [r["val_bpb"]["mean"] for r in rows],
         [r["val_bpb"]["std"] for r in rows]),
        ("tokens/s", [r["tokens_per_second"]["mean"] for r in rows], None),
        ("peak memory MiB", [r["peak_mib"] for r in rows], None),
        ("params (M): total, activated hatched", [r["params_total"] / 1e6 for r in rows], None),
        ("train FLOPs/token (M)", [r["flops_per_token"] / 1e6 for r in rows], None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 1.5 + 0.28 * len(rows)), sharey=True)
    for ax, (name, values, errors) in zip(axes, panels):
        ax.barh(y, values, color=color, xerr=errors if errors and any(errors) else None)
        if name.startswith("params"):
            ax.barh(y, [r["params_activated"] / 1e6 for r in rows], color="none", edgecolor="black", hatch="//")
        if name.startswith("val"):
            low, high = min(values), max(values)
            ax.set_xlim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    from matplotlib.patches import Patch

    axes[0].legend(handles=[Patch(color=c, label=n) for n, c in colors.items()], fontsize=7, loc="lower right")
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Plan the grid, train every planned cell (each seed in its own process), and write the tables."""
    args = _arguments(argv)
    scale = QUICK if args.quick else FULL
    if args.steps is not None:
        scale = dataclasses.replace(scale, steps=args.steps, warmup_steps=min(scale.warmup_steps, args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    planned, skipped, reference = _plan(_cells(args), scale, args.match, args.tolerance)
    _print_plan(planned, skipped, reference, args)
    results = _train_cells(planned, skipped, args, scale)
    rows = _rows(planned, results, skipped)
    wall = time.perf_counter() - started
    _write(out, rows, skipped, args, scale, reference, wall)
    if planned and not rows:
        raise SystemExit("no cell trained; see the skipped list above for each one's reason")


def _cells(args: argparse.Namespace) -> list[Cell]:
    """The grid's cells (the quick handful or the whole product) that the axis filters keep."""
    attentions = _parse_axis(args.attention, ATTENTIONS, "--attention")
    positions = _parse_axis(args.position, POSITIONS, "--position")
    ffns = _parse_axis(args.feed_forward, FEED_FORWARDS, "--feed-forward")
    grid = QUICK_CELLS if args.quick else [Cell(*c) for c in itertools.product(ATTENTIONS, POSITIONS, FEED_FORWARDS)]
    return [c for c in grid if c.attention in attentions and c.position in positions and c.feed_forward in ffns]


def _print_plan(planned: list[Planned], skipped: dict[str, str], reference: Size, args: argparse.Namespace) -> None:
    print(f"budget ({args.match}, from {'/'.join(REFERENCE)} at FFN width {reference.hidden}): "
          f"{reference.block_params:,} block parameters, {reference.block_flops:,.0f} block training FLOPs/token; "
          f"each cell within ±{args.tolerance:.0%}", flush=True)
    for p in planned:
        print(f"  {p.cell.name:<30} FFN width {p.size.hidden:>4}  params {p.size.params_total:>10,} "
              f"(activated {p.size.params_activated:>12,.0f})  train FLOPs/token {p.size.flops_per_token:>12,.0f}  "
              f"{args.match} {p.deviation:+.2%}", flush=True)
    for name, reason in skipped.items():
        print(f"  {name:<30} skipped: {reason}", flush=True)


def _train_cells(planned: list[Planned], skipped: dict[str, str], args: argparse.Namespace,
                 scale: Scale) -> dict[str, dict[int, dict[str, Any]]]:
    """Train every planned cell for every seed, each in its own process: cell name -> seed ->
    what it measured. A cell that fails is added to `skipped` with the reason."""
    # The corpus is prepared once here; every cell's process then only loads the cached tokens.
    import fiddle as fdl

    corpus = fdl.build(run_config(Cell(*REFERENCE), scale.reference_hidden, scale).data)
    corpus.prepare()
    bytes_per_token = corpus.bytes_per_token("val")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tessera.components.builtin", "tessera.components.train.trainer",
                                "tessera.components.ablation.cells", "tessera.recipes.ablation"])
    runs = [(p, seed) for p in planned for seed in range(args.seeds)]
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for i, (p, seed) in enumerate(runs, 1):
        payload = {"cell": dataclasses.astuple(p.cell), "hidden": p.size.hidden, "scale": dataclasses.asdict(scale),
                   "seed": seed, "precision": args.precision, "device": args.device, "threads": args.threads,
                   "validation_batches": VALIDATION_BATCHES["quick" if args.quick else "full"],
                   "bytes_per_token": bytes_per_token}
        message = _run_cell(ctx, payload)
        if message["ok"]:
            print(f"[{i}/{len(runs)}] {p.cell.name} seed {seed}: val bits/byte {message['val_bpb']:.4f}, "
                  f"{message['tokens_per_second']:,.0f} tokens/s, peak {message['peak_mib']:.0f} MiB, "
                  f"{message['seconds']:.1f} s", flush=True)
            results.setdefault(p.cell.name, {})[seed] = message
        else:
            print(f"[{i}/{len(runs)}] {p.cell.name} seed {seed}: FAILED {message['error']}", flush=True)
            skipped[p.cell.name] = f"failed while training (seed {seed}): {message['error']}"
    return results


def _rows(planned: list[Planned], results: dict[str, dict[int, dict[str, Any]]],
          skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One table row per cell that trained (every seed summarised)."""
    rows: list[dict[str, Any]] = []
    for p in planned:
        per_seed = results.get(p.cell.name, {})
        if p.cell.name in skipped or not per_seed:
            continue
        measured = list(per_seed.values())
        rows.append({
            "attention": p.cell.attention, "position": p.cell.position, "feed_forward": p.cell.feed_forward,
            "hidden": p.size.hidden, "params_total": p.size.params_total,
            "params_activated": p.size.params_activated, "block_params": p.size.block_params,
            "block_flops": p.size.block_flops, "flops_per_token": p.size.flops_per_token,
            "deviation": p.deviation, "seeds": sorted(per_seed),
            "per_seed": {s: m["val_bpb"] for s, m in per_seed.items()},
            "val_bpb": _summary([m["val_bpb"] for m in measured]),
            "tokens_per_second": _summary([m["tokens_per_second"] for m in measured]),
            "peak_mib": max(m["peak_mib"] for m in measured),
            "over_start_mib": max(m["peak_mib"] - m["start_mib"] for m in measured)})
    return rows


def _write(out: Path, rows: list[dict[str, Any]], skipped: dict[str, str], args: argparse.Namespace, scale: Scale,
           reference: Size, wall: float) -> None:
    memory = ("peak GPU memory allocated by torch" if args.device.startswith("cuda") else
              "peak resident set of the cell's own process (ru_maxrss; includes the Python/torch runtime, "
              "whose share is the column 'memory over start' subtracts)")
    lines = [
        f"# Architecture ablation ({'quick' if args.quick else 'full'}, equal {args.match})", "",
        f"Every cell: dim {scale.dim}, {scale.n_layers} layers, {scale.n_heads} heads, vocab {scale.vocab_size}, "
        f"{scale.steps} steps x {scale.batch_size} x {scale.seq_len} = {scale.tokens:,} training tokens of the "
        f"default corpus (stdlib_corpus), AdamW lr {scale.lr:g}, precision {args.precision}, device {args.device}, "
        f"threads {args.threads or 'torch default'}. MoE: {scale.n_routed} routed experts (top-{scale.top_k}) + "
        f"{scale.n_shared} shared, each of the FFN width.",
        "",
        f"Budget: the reference cell {'/'.join(REFERENCE)} (FFN width {scale.reference_hidden}) has "
        f"{reference.block_params:,} block parameters and {reference.block_flops:,.0f} block training FLOPs/token "
        f"(embedding and head excluded: identical in every cell); each cell's FFN width is chosen to match its "
        f"{'block parameters' if args.match == 'params' else 'block training FLOPs/token'} within "
        f"±{args.tolerance:.0%} (column '{args.match} vs budget').",
        f"Memory: {memory}.",
        f"Machine: {platform.processor() or platform.machine()} ({cpu_model()}), {multiprocessing.cpu_count()} "
        f"CPUs; wall time {wall / 60:.1f} min.",
        "",
        *_table(rows, args.match, args.seeds),
        "",
        "## Skipped",
        "",
        *([f"- {name}: {reason}" for name, reason in skipped.items()] or ["- none"]),
    ]
    comparison = _moe_comparison(rows)
    if comparison:
        lines += ["", "## MoE (shared + routed experts) against dense SwiGLU", "", *comparison]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({
        "match": args.match, "tolerance": args.tolerance, "quick": args.quick, "seeds": args.seeds,
        "scale": dataclasses.asdict(scale), "reference": dataclasses.asdict(reference), "rows": rows,
        "skipped": skipped, "wall_seconds": wall, "cpu": cpu_model(), "cpus": multiprocessing.cpu_count()},
        indent=1))
    if rows:
        _plot(rows, out / "ablation.png", f"equal {args.match}, {scale.tokens:,} tokens per cell")
    print("\n".join(lines))
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.png'}, {out / 'results.json'} in {wall:.0f} s")



if __name__ == "__main__":
    sys.exit(main())
