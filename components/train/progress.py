"""Rich live progress for the training loop: step, loss, lr, tokens/s, ETA.

`Progress` is the run's setting (`progress=fdl.Config(Progress, log_every=5)`, or
`progress=None` for a silent run); `TrainProgress` is the display it configures.
"""

from __future__ import annotations

import dataclasses
import time

import rich.progress
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tessera.registry.invariants import invariant


@invariant("log_every >= 0", lambda log_every: log_every >= 0, fix="use log_every >= 0 (0: the bar only)")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Progress:
    """What the main process shows while it trains: a live bar, the precision it chose and
    notes (resume, rollback), and a printed line every `log_every` steps (and after the first),
    visible in logs without a TTY (0: no lines). A run with `progress=None` prints nothing."""

    log_every: int = 25


class TrainProgress:
    """A progress bar plus a printed line every `log_every` steps (visible in logs without a TTY)."""

    def __init__(self, *, total_steps: int, log_every: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console()
        self.log_every = log_every
        self.enabled = enabled
        self._progress = rich.progress.Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total_steps, loss=float("nan"), lr=0.0, tps=0.0)
        self._start = time.perf_counter()
        self._tokens = 0

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    @property
    def tokens_per_second(self) -> float:
        return self._tokens / max(1e-9, time.perf_counter() - self._start)

    def update(self, *, step: int, loss: float, lr: float, tokens: int, grad_norm: float, note: str = "") -> None:
        """Advance to `step`; `note` (e.g. MFU, expert-load imbalance) joins the printed line."""
        self._tokens += tokens
        tps = self.tokens_per_second
        self._progress.update(self._task, completed=step + 1, loss=loss, lr=lr, tps=tps)
        if self.enabled and self.log_every and ((step + 1) % self.log_every == 0 or step == 0):
            self._progress.console.print(
                f"step {step + 1:>5}  loss {loss:.4f}  lr {lr:.2e}  grad-norm {grad_norm:.3f}  {tps:,.0f} tok/s"
                f"{'  ' + note if note else ''}",
                highlight=False, soft_wrap=True,
            )
