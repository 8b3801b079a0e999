"""Draw a `metrics.profile` trace as a picture: the profiled step's ops on a time axis.

    python benchmarks/trace_picture.py runs/X/trace-steps-3-3.json docs/assets/profile-trace.png

Each row is a nesting depth of the trace's complete ("X") events on the main thread: the
step's span on top, then the modules' and ops' spans inside it; the widest op names are written
on their bars. The same file opens interactively in https://ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def spans(trace: dict) -> list[tuple[float, float, str, int]]:
    """(start ms, duration ms, name, depth) of the main thread's complete events, depth by nesting."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    step = next(e for e in events if e["name"].startswith("step"))
    main = [e for e in events if e.get("tid") == step.get("tid") and e.get("pid") == step.get("pid")]
    main.sort(key=lambda e: (e["ts"], -e["dur"]))
    out, open_ends = [], []
    for e in main:
        while open_ends and open_ends[-1] <= e["ts"]:
            open_ends.pop()
        out.append(((e["ts"] - step["ts"]) / 1e3, e["dur"] / 1e3, e["name"], len(open_ends)))
        open_ends.append(e["ts"] + e["dur"])
    return out


def draw(rows: list[tuple[float, float, str, int]], png: Path, *, depth: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 3.2))
    total = max(start + dur for start, dur, _, d in rows if d == 0)
    colours = plt.get_cmap("tab20")
    for start, dur, name, d in rows:
        if d >= depth:
            continue
        ax.barh(-d, dur, left=start, height=0.8, color=colours(hash(name) % 20), edgecolor="white", linewidth=0.3)
        if dur > total * 0.06:
            ax.text(start + dur / 2, -d, name[:28], ha="center", va="center", fontsize=7, clip_on=True)
    ax.set_yticks([-d for d in range(depth)], [f"depth {d}" for d in range(depth)], fontsize=7)
    ax.set_xlabel("ms since the step began")
    ax.set_xlim(0, total)
    ax.set_title("one profiled training step (metrics.profile), main thread", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    draw(spans(json.loads(args.trace.read_text())), args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
