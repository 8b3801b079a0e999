"""The training loop: step after step until the run has taken `steps`, or a signal stops it.

Each turn takes one optimizer step (`StepRunner`), lets recovery handle a step the guard
rejected, books the tokens and loss terms, validates when it is time, reports, and saves a
checkpoint when one is due (or when a signal asks the run to stop, which then ends it with
`RunInterrupted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.metrics import Metrics
from tessera.components.train.out_of_memory import explain_out_of_memory
from tessera.components.train.preemption import RunInterrupted, StopRequest, interrupted_message
from tessera.components.train.profiling import step_profiler
from tessera.components.train.progress import Progress, TrainProgress
from tessera.components.train.recovery import after_rejected_step
from tessera.components.train.report import StepReporter
from tessera.components.train.run_state import RunState, snapshot
from tessera.components.train.step import StepOutcome, StepRunner
from tessera.components.train.stragglers import StragglerTracker
from tessera.components.train.validation import Validator
from tessera.components.train.watchdog import StepWatch, Watchdog


@dataclasses.dataclass(kw_only=True)
class LoopEnd:
    """How the loop ended: the validation of its last step (None unless that step validated),
    the training throughput it saw, and the console it reported on (None: it printed nothing)."""

    validation: dict[str, float] | None
    tokens_per_second: float
    console: Console | None


@dataclasses.dataclass(kw_only=True)
class TrainingLoop:
    """Runs `runner` from `state.step` to `steps`. `metrics` and `progress` are None on the
    processes that do not report; `eval_every` (0: never) is the same on every process, as
    validation is collective."""

    runner: StepRunner
    state: RunState
    steps: int
    seq_len: int
    validator: Validator
    eval_every: int
    checkpoint: Checkpointer | None
    guard: StabilityGuard | None
    metrics: Metrics | None
    progress: Progress | None
    flops_per_token: float
    """Training FLOPs per token on each process (MFU)."""
    watchdog: Watchdog | None = None
    """Hung steps and stragglers (None or disabled: neither watched nor named)."""

    def run(self) -> LoopEnd:
        """Train until `steps` (an out-of-memory error is re-raised with advice; a signal ends
        the run after the current step with `RunInterrupted`)."""
        validation = None
        runner = self.runner
        with explain_out_of_memory(), StopRequest() as stop, \
                TrainProgress(total_steps=self.steps, log_every=self.progress.log_every if self.progress else 0,
                              enabled=self.progress is not None) as bar, self._watch() as watch:
            reporter = StepReporter(bar=bar, metrics=self.metrics, model=runner.model, seq_len=self.seq_len,
                                    flops_per_token=self.flops_per_token,
                                    layer_group=runner.parallel.gradient_norm_group())  # pipeline: every layer's load
            stragglers = StragglerTracker(margin=watch.options.straggler_margin,
                                          steps=watch.options.straggler_steps) if watch is not None else None
            profiler = step_profiler(self.metrics.profile, folder=self.metrics.folder, device=runner.device) \
                if self.metrics is not None else None
            while self.state.step < self.steps:
                step_start = time.perf_counter()
                if watch is not None:
                    watch.begin(self.state.step)
                with profiler.step(self.state.step + 1, final=self.state.step + 1 == self.steps) \
                        if profiler is not None else contextlib.nullcontext():
                    outcome = runner.run(self.state)
                self._book(outcome, bar)
                rank_times = self._rank_times(watch, stragglers, bar)
                validation = self.validator() if self.eval_every and (self.state.step + 1) % self.eval_every == 0 \
                    else None
                reporter.report(step=self.state.step, outcome=outcome, loss=self.state.losses[-1],
                                lr=runner.optimizer.param_groups[0]["lr"], tokens=self.state.tokens,
                                seconds=time.perf_counter() - step_start, validation=validation,
                                rank_times=rank_times)
                self.state.step += 1
                self._save_or_stop(outcome, stop.agreed(runner.device))
            return LoopEnd(validation=validation, tokens_per_second=bar.tokens_per_second,
                           console=bar.console if self.progress is not None else None)

    def _watch(self) -> contextlib.AbstractContextManager[StepWatch | None]:
        """The running watchdog, or nothing when it is off."""
        if self.watchdog is None or not self.watchdog.enabled:
            return contextlib.nullcontext()
        return StepWatch(options=self.watchdog)

    def _rank_times(self, watch: StepWatch | None, stragglers: StragglerTracker | None,
                    bar: TrainProgress) -> dict[str, list[float]] | None:
        """End the watched step; with several processes, gather every rank's step time and
        time blocked in collectives (one all-gather), print any straggler (main process) and
        return the lists for the metrics row. None: not watched, or one process."""
        if watch is None:
            return None
        seconds, blocked = watch.end()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        mine = torch.tensor([seconds, blocked], dtype=torch.float64, device=self.runner.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        times = [t.tolist() for t in every]
        if stragglers is not None and self.progress is not None:
            for note in stragglers.observe([max(wall - wait, 0.0) for wall, wait in times]):
                bar.console.print(note, highlight=False, soft_wrap=True)
        return {"step_time_ranks": [wall for wall, _ in times], "wait_time_ranks": [wait for _, wait in times]}

    def _book(self, outcome: StepOutcome, bar: TrainProgress) -> None:
        """Hand a rejected step to recovery (which may roll back, or stop the run), then count
        the step's tokens and record its loss terms."""
        state, runner = self.state, self.runner
        if self.guard is not None and not outcome.update:
            note = after_rejected_step(outcome, state=state, guard=self.guard, checkpoint=self.checkpoint,
                                       model=runner.model, optimizer=runner.optimizer, scheduler=runner.scheduler,
                                       base_lr=runner.base_lrs[0], grad_clip=runner.options.grad_clip,
                                       precision=runner.precision)
            if note is not None and self.progress is not None:
                bar.console.print(note, highlight=False, soft_wrap=True)
        state.tokens += outcome.sequences * self.seq_len
        for name, value in outcome.terms.items():
            state.record(name, value)

    def _save_or_stop(self, outcome: StepOutcome, signum: int) -> None:
        """Save when a checkpoint is due (never a bad streak or a rolled-back step: it would
        become the rollback point) or a signal (`signum`, 0: none) asks the run to stop, and
        then stop it."""
        state, checkpoint = self.state, self.checkpoint
        healthy = self.guard is None or outcome.update
        saved: Path | None = None
        if checkpoint is not None and (signum or healthy and (state.step % checkpoint.every == 0
                                                              or state.step == self.steps)):
            saved = checkpoint.save(state.step, model=self.runner.model, optimizer=self.runner.optimizer,
                                    extra=snapshot(state, scaler=self.runner.scaler, guard=self.guard,
                                                   data=self.runner.data, parallel=self.runner.parallel))
        if signum:
            if checkpoint is not None:
                checkpoint.wait()
            raise RunInterrupted(interrupted_message(signum, state.step, self.steps, saved), signum=signum)
