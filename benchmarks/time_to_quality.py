"""Time to quality of the flagship recipe: wall time from the start of training to the first
validation at or below a target loss, for the `debug_baseline` preset (AdamW, as `debug` was
before this work) against the default preset `debug` (Muon, WSD) of `recipes/deepseek_pretrain.py`.

    python benchmarks/time_to_quality.py                       # 3 seeds each, precision as the presets say
    python benchmarks/time_to_quality.py --seeds 0 1 2 3 4 --precision fp32
    python benchmarks/time_to_quality.py --only debug --seeds 0 --every 10 --json /tmp/curve.json  # one curve

What is measured, and how:

- Both presets are judged on one fixed validation set: the trainer's `Validator.sample` taken
  at the baseline's geometry (8 batches of 16 x 128 tokens of the default corpus's validation
  stream, sample seed 0) whatever the run's own batch size, sequence length or seed, so every
  evaluation of every run scores the same 16,384 tokens.
- The target is the baseline's own final loss on that set, the median over its seeds (the
  baseline runs first in every round, so the target is known before it is needed; a run's
  crossing is read from its curve afterwards).
- Validation runs every `--every` steps (10) and its time is kept out of the clock: the clock
  starts when `train` is called (the model is materialised, any compilation is inside the
  clock) and stops at the first validation at or below the target, minus every validation's
  own time. The presets' own periodic evaluation (validation, held-out cloze task) and
  checkpoints are switched off here; their cost on the presets' wall time is not measured.
- Runs are interleaved (baseline seed s, improved seed s, next seed), each reported as the
  median over seeds; the ratio is improved / baseline of the medians.

Results go to `benchmarks/results/time_to_quality.md` (and `.json`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fiddle as fdl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tessera.components.train.trainer as trainer_module  # noqa: E402
from tessera.components.train.compute import Compute  # noqa: E402
from tessera.components.train.launch import build_model_on_meta  # noqa: E402
from tessera.components.train.metrics import Metrics  # noqa: E402
from tessera.components.train.validation import Validator  # noqa: E402
from tessera.registry import PRECISION  # noqa: E402
from tessera.registry.overrides import apply_overrides  # noqa: E402

# The fixed validation set: the baseline's own geometry (its micro-batch 16, seq_len 128, the
# default 8 batches) and sample seed 0, for every run of either preset.
VAL_BATCHES, VAL_BATCH_SIZE, VAL_SEQ_LEN, VAL_SEED = 8, 16, 128, 0
RESULTS = ROOT / "benchmarks" / "results" / "time_to_quality"


def load_recipe():
    """The `Recipe` object of recipes/deepseek_pretrain.py."""
    spec = importlib.util.spec_from_file_location("deepseek_pretrain", ROOT / "recipes" / "deepseek_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.recipe


@dataclasses.dataclass
class Curve:
    """Validation losses of one run: `points` as (step, training seconds, loss); `excluded`:
    seconds spent validating, kept out of the clock."""

    points: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    excluded: float = 0.0
    started: float = 0.0


class ClockedValidator(Validator):
    """The trainer's `Validator` on the fixed sample, recording each call's loss against the
    training time so far (validation time excluded). `every`: the step spacing of the calls."""

    curve: Curve
    every: int

    def __call__(self) -> dict[str, float]:
        begin = time.perf_counter()
        out = super().__call__()
        step = (len(self.curve.points) + 1) * self.every
        self.curve.points.append((step, begin - self.curve.started - self.curve.excluded, out["val_loss"]))
        self.curve.excluded += time.perf_counter() - begin
        return out


def run(config: fdl.Partial, *, seed: int, every: int, precision: str | None, threads: int = 1) -> Curve:
    """Train `config` with seed `seed` on `threads` torch threads, validating every `every` steps
    on the fixed set; its curve."""
    config = copy.deepcopy(config)
    config.seed = seed
    # the presets leave torch's default thread count, which differs by machine and launching shell
    compute = config.compute  # a Config where the preset sets it, else train's default Compute()
    if isinstance(compute, fdl.Buildable):
        compute.threads = threads
    else:
        config.compute = fdl.Config(Compute, **{**dataclasses.asdict(compute), "threads": threads})
    if precision is not None:
        config.precision = PRECISION.config(precision)
    steps = config.steps
    if steps % every:
        raise SystemExit(f"error: --every {every} must divide the preset's steps ({steps}); pick a divisor")
    folder = tempfile.mkdtemp(prefix="ttq_")
    config.metrics = fdl.Config(Metrics, folder=folder, eval_every=every, tensorboard=False, plots=False)
    config.checkpoint = None
    config.progress = None
    curve = Curve()

    def validator(**kwargs: Any) -> ClockedValidator:
        kwargs.update(batches=VAL_BATCHES, batch_size=VAL_BATCH_SIZE, seq_len=VAL_SEQ_LEN, seed=VAL_SEED,
                      downstream=())
        made = ClockedValidator(**kwargs)
        made.curve, made.every = curve, every
        return made

    job_config = copy.copy(config)
    job_config.model = build_model_on_meta(config.model)
    job = fdl.build(job_config)
    original = trainer_module.Validator
    trainer_module.Validator = validator  # the trainer builds its validator by this name
    try:
        curve.started = time.perf_counter()
        job()
    finally:
        trainer_module.Validator = original
        shutil.rmtree(folder, ignore_errors=True)  # the run's metrics files: the curve is all we keep
    return curve


def crossing(curve: Curve, target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first validation at or below `target`; None: never."""
    return next(((step, seconds) for step, seconds, loss in curve.points if loss <= target), None)


def seconds_per_step(curve: Curve) -> float:
    """Training seconds per step over the whole run (validation excluded)."""
    step, seconds, _ = curve.points[-1]
    return seconds / step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=10, help="validate every this many steps")
    parser.add_argument("--precision", default=None, help="override both presets' precision (e.g. fp32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: side by side, reproducible)")
    parser.add_argument("--baseline", default="debug_baseline")
    parser.add_argument("--improved", default="debug")
    parser.add_argument("--only", default=None, help="run this one preset (a curve, no ratio)")
    parser.add_argument("--set", nargs="+", default=[], metavar="PATH=VALUE",
                        help="overrides for the improved (or --only) preset, as on the recipe's command line")
    parser.add_argument("--json", default=None, help="write the raw curves here")
    parser.add_argument("--out", default=None,
                        help="results name under benchmarks/results/ (default: time_to_quality[_PRECISION])")
    parser.add_argument("--report", default=None, help="only rewrite the table from a results .json of an earlier run")
    args = parser.parse_args(argv)
    if args.report:
        raw = json.loads(Path(args.report).read_text())["runs"]
        args.seeds = [run["seed"] for run in raw[args.baseline]]
        curves = {name: [Curve(points=[tuple(p) for p in run["points"]], excluded=run["excluded"]) for run in runs]
                  for name, runs in raw.items()}
        report(args, curves, raw)
        return
    recipe = load_recipe()
    names = [args.only] if args.only else [args.baseline, args.improved]
    configs = {name: recipe.config(name) for name in names}
    if args.set:
        apply_overrides(configs[names[-1]], args.set)
    curves: dict[str, list[Curve]] = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            curve = run(configs[name], seed=seed, every=args.every, precision=args.precision, threads=args.threads)
            curves[name].append(curve)
            last = curve.points[-1]
            print(f"{name} seed {seed}: final val {last[2]:.4f} at step {last[0]}, {last[1]:.1f} s training "
                  f"({curve.excluded:.1f} s validating, excluded)", flush=True)
    raw = {name: [{"seed": s, "points": c.points, "excluded": c.excluded} for s, c in zip(args.seeds, cs)]
           for name, cs in curves.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(raw))
    if args.only:
        return
    report(args, curves, raw)


def report(args: argparse.Namespace, curves: dict[str, list[Curve]], raw: dict[str, Any]) -> None:
    """Print and write the table: the target, each preset's median time to it, the ratio."""
    base, new = args.baseline, args.improved
    target = statistics.median(c.points[-1][2] for c in curves[base])
    rows, medians = [], {}
    for name in (base, new):
        hits = [crossing(c, target) for c in curves[name]]
        times = [h[1] if h else float("inf") for h in hits]
        medians[name] = statistics.median(times)
        finals = [c.points[-1][2] for c in curves[name]]
        total = [c.points[-1][1] for c in curves[name]]
        rows.append(f"| `{name}` | {' / '.join(f'{t:.1f}' for t in times)} | {medians[name]:.1f} | "
                    f"{' / '.join(str(h[0]) if h else 'never' for h in hits)} | "
                    f"{statistics.median(finals):.4f} | {statistics.median(total):.1f} |")
    ratio = medians[new] / medians[base]
    # Load-robust estimate: steps to the target (deterministic) times the per-step time ratio of
    # the two runs of one seed, which ran next to each other under similar load.
    per_step = statistics.median(seconds_per_step(c_new) / seconds_per_step(c_base)
                                 for c_base, c_new in zip(curves[base], curves[new]))
    steps = {name: statistics.median(h[0] if h else math.inf for h in (crossing(c, target) for c in curves[name]))
             for name in (base, new)}
    estimate = steps[new] / steps[base] * per_step
    import torch

    from tessera.components.precision.auto import choose
    from tessera.components.precision.probe import cpu_model

    precision = args.precision or f"auto ({choose('cpu')[0].compute_dtype})".replace("torch.", "")
    lines = [
        f"Target: {target:.4f} nats/token, the median final loss of `{base}` over seeds {args.seeds} on the fixed "
        f"validation set ({VAL_BATCHES} x {VAL_BATCH_SIZE} x {VAL_SEQ_LEN} tokens, sample seed {VAL_SEED}); "
        f"precision {precision}; validation every {args.every} steps, kept out of the clock."
        + (f" `{new}` with `{' '.join(args.set)}`." if args.set else ""),
        "",
        "| preset | seconds to target, per seed | median s | step reached | median final loss | median s, whole run |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Ratio {new} / {base} of the median times to target: {ratio:.2f}. Load-robust estimate: median "
        f"steps to target {steps[new]:.0f} / {steps[base]:.0f}, times the median per-step time ratio of the two "
        f"runs of one seed ({per_step:.2f}): **{estimate:.2f}**.",
        "",
        f"Measured"
        f" {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{args.threads} thread(s) per run, {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}).",
    ]
    text = "\n".join(lines)
    print(text)
    out = RESULTS.parent / (args.out or RESULTS.name + ("" if args.precision is None else f"_{args.precision}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(text + "\n")
    Path(f"{out}.json").write_text(json.dumps({"target": target, "ratio": ratio, "estimate": estimate, "runs": raw}))


if __name__ == "__main__":
    main()
