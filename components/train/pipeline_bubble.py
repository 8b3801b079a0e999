"""Pipeline schedules in closed form: the idle fraction (bubble) of a training step and how
many micro-batches' activations a rank holds at its peak.

p: pipeline ranks, m: micro-batches per step, v: stages per rank (interleaved 1F1B).
Times are in units of one stage's forward F, with a full backward B = 2F of which the
weight-gradient part W = F, and an overlapped forward-and-backward chunk F&B = F + B (the
overlap hides communication, not compute). These ratios are assumptions a caller can change.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "dualpipev")
"""The schedules in closed form; any spelling that differs only in case and underscores names
the same one (the parallel plans' "GPipe", "1F1B", "Interleaved1F1B", "DualPipeV")."""


def _known(schedule: str) -> str:
    """`schedule` as spelled in `SCHEDULES`, or ValueError naming them."""
    for name in SCHEDULES:
        if name.replace("_", "") == schedule.lower().replace("_", ""):
            return name
    raise ValueError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def bubble_fraction(schedule: str, *, p: int, m: int, v: int = 1, f: float = 1.0, b: float = 2.0,
                    w: float = 1.0, fb: float | None = None) -> float:
    """Idle share of a step on each pipeline rank.

    gpipe, 1f1b: (p-1) / (m+p-1) (GPipe, arXiv:1811.06965 §2.2; 1F1B keeps the same bubble,
    arXiv:2104.04473 §2.2.1). interleaved_1f1b: (p-1) / (v*m+p-1) (arXiv:2104.04473 §2.2.2).
    dualpipev: DeepSeek-V3 (arXiv:2412.19437 §3.2.1, Table 2) gives DualPipe's bubble as
    (S/2-1)(F&B+B-3W) over S stages; DualPipeV folds the S stages onto S/2 ranks (two per
    rank, a "V"), so with p ranks the bubble time is (p-1)(F&B+B-3W), against 2m(F+B) of work
    per rank (every micro-batch visits both of its stages).
    """
    schedule = _known(schedule)
    if p == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    fb = f + b if fb is None else fb
    idle = (p - 1) * (fb + b - 3 * w)
    return idle / (idle + 2 * m * (f + b))


def in_flight(schedule: str, *, p: int, m: int, v: int = 1, rank: int = 0) -> float:
    """Micro-batches of activations pipeline rank `rank` holds at its peak, in units of that
    rank's whole share of layers for one micro-batch.

    gpipe: all m (every forward runs before any backward). 1f1b: min(p - rank, m).
    interleaved_1f1b: rank r runs (v-1)p + 2(p-1-r) + 1 chunk forwards before its first backward
    (arXiv:2104.04473 §2.2.2's warm-up), each 1/v of its layers. dualpipev: S+1 stage
    activations with S = 2p stages (arXiv:2412.19437 Table 2: "PP+1"), each half of the rank's
    layers.
    """
    schedule = _known(schedule)
    if p == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(p - rank, m))
    if schedule == "interleaved_1f1b":
        return min((v - 1) * p + 2 * (p - 1 - rank) + 1, v * m) / v
    return min(2 * p + 1, 2 * m) / 2


def peak_activations(schedule: str, *, p: int, m: int, v: int = 1, rank: int = 0,
                     stage_bytes: list[float]) -> tuple[float, bool]:
    """The most activation bytes pipeline rank `rank` holds at once during a step, and whether
    a backward had run on the rank by then (so that its gradients exist at that peak).

    stage_bytes: what one micro-batch saves in each stage the rank holds, in the order of its
    stages (stage r first, then r + p, ...); stages of unequal depth weigh differently.
    gpipe, 1f1b and interleaved_1f1b follow the rank's order of forwards and backwards in
    torch's schedules: GPipe all m forwards, then the backwards; 1F1B p - rank forwards, then
    one backward and one forward in turn; interleaved 1F1B forwards `round` micro-batches per
    stage in turn, (v-1) round + 2 (p-1-rank) of them before one forward and one backward
    alternate (arXiv:2104.04473 §2.2.2; round = m / (m // p)). dualpipev: `in_flight` times the
    rank's whole share (its two stages taken as one).
    """
    schedule = _known(schedule)
    if p == 1 or schedule == "dualpipev":
        flight = in_flight(schedule, p=p, m=m, v=v, rank=rank)
        return flight * sum(stage_bytes), p > 1 and flight < m
    live = peak = 0.0
    backwards, held = 0, False
    for kind, stage in _rank_order(schedule, p=p, m=m, v=len(stage_bytes), rank=rank):
        if kind == "B":
            live -= stage_bytes[stage]
            backwards += 1
            continue
        live += stage_bytes[stage]
        if live > peak or (live == peak and backwards):
            peak, held = live, backwards > 0
    return peak, held


def _rank_order(schedule: str, *, p: int, m: int, v: int, rank: int) -> list[tuple[str, int]]:
    """("F" or "B", local stage) in the order rank `rank` runs them (see `peak_activations`)."""
    if schedule == "gpipe":
        return [("F", 0)] * m + [("B", 0)] * m
    if schedule == "1f1b":
        warm = min(p - rank, m)
        return [("F", 0)] * warm + [op for _ in range(m - warm) for op in (("B", 0), ("F", 0))] + [("B", 0)] * warm
    per_round = m // max(1, m // p)
    warm = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
    forward = [(step // per_round) % v for step in range(m * v)]
    backward = [v - 1 - (step // per_round) % v for step in range(m * v)]
    order = [("F", s) for s in forward[:warm]]
    for step in range(warm, m * v):
        order += [("F", forward[step]), ("B", backward[step - warm])]
    return order + [("B", s) for s in backward[m * v - warm:]]
