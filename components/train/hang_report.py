"""The one message a hung run ends with: which ranks did not arrive, and where every rank was.

Each rank's watchdog posts a `RankReport` when its step runs past the limit. A rank that is
behind the others (an earlier step, or fewer collectives entered in the same step) is one the
rest are waiting for; a rank that posts nothing is stuck so hard its watchdog thread cannot
run (a native call holding the interpreter) or is gone.
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankReport:
    """Where one rank was when its watchdog fired: the step it was in, the seconds the step
    had run, and the last collective it entered (`collective` 0: none yet)."""

    rank: int
    step: int
    seconds: float
    collective: int
    collective_name: str
    collective_step: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> RankReport:
        return cls(**json.loads(text))

    def where(self) -> str:
        entered = (f"{self.collective_name} #{self.collective} (entered at step {self.collective_step})"
                   if self.collective else "none yet")
        return f"rank {self.rank}: in step {self.step} for {self.seconds:.0f} s; last collective entered: {entered}"


def behind(reports: list[RankReport], world_size: int) -> list[int]:
    """Ranks the others are waiting for: those with no report, and those whose (step,
    collectives entered) is short of the furthest rank's. Empty when every rank reported the
    same place (they all wait inside one collective: the network or the collective hangs)."""
    seen = {r.rank for r in reports}
    furthest = max(((r.step, r.collective) for r in reports), default=(0, 0))
    late = {r.rank for r in reports if (r.step, r.collective) < furthest}
    return sorted(late | (set(range(world_size)) - seen))


def hang_message(reports: list[RankReport], *, world_size: int, limit_s: float) -> str:
    """The message naming the ranks that did not arrive, followed by one line per rank."""
    late = behind(reports, world_size)
    silent = sorted(set(range(world_size)) - {r.rank for r in reports})
    step = max((r.step for r in reports), default=-1)
    if world_size == 1:
        head = f"hang: step {step} ran past the watchdog limit of {limit_s:g} s"
    elif late:
        names = ", ".join(map(str, late))
        head = (f"hang: rank{'s' if len(late) > 1 else ''} {names} did not arrive; the other ranks waited at "
                f"step {step} past the watchdog limit of {limit_s:g} s")
    else:
        head = (f"hang: every rank entered the same collective at step {step} and none came out within the "
                f"watchdog limit of {limit_s:g} s (the network or the collective itself hangs)")
    lines = [head, *(r.where() for r in sorted(reports, key=lambda r: r.rank))]
    lines += [f"rank {r}: sent no report (stuck in native code holding the interpreter, or gone)" for r in silent]
    lines.append("the run exits; restart it with --resume (from the newest complete checkpoint, if the run writes "
                 "them); raise watchdog.limit_s if a step may legitimately take this long")
    return "\n".join(lines)
