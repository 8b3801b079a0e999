"""The training loop: step after step until the run has taken `steps`, or a signal stops it.

Each turn takes one optimizer step (`StepRunner`), lets recovery handle a step the guard
rejected, books the tokens and loss terms, validates when it is time, reports, and saves a
checkpoint when one is due (or when a signal asks the run to stop, which then ends it with
`RunInterrupted`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console

from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.metrics import Metrics
from tessera.components.train.out_of_memory import explain_out_of_memory
from tessera.components.train.preemption import RunInterrupted, StopRequest, interrupted_message
from tessera.components.train.progress import Progress, TrainProgress
from tessera.components.train.recovery import after_rejected_step
from tessera.components.train.report import StepReporter
from tessera.components.train.run_state import RunState, snapshot
from tessera.components.train.step import StepOutcome, StepRunner
from tessera.components.train.validation import Validator


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

    def run(self) -> LoopEnd:
        """Train until `steps` (an out-of-memory error is re-raised with advice; a signal ends
        the run after the current step with `RunInterrupted`)."""
        validation = None
        runner = self.runner
        with explain_out_of_memory(), StopRequest() as stop, \
                TrainProgress(total_steps=self.steps, log_every=self.progress.log_every if self.progress else 0,
                              enabled=self.progress is not None) as bar:
            reporter = StepReporter(bar=bar, metrics=self.metrics, model=runner.model, seq_len=self.seq_len,
                                    flops_per_token=self.flops_per_token,
                                    layer_group=runner.parallel.gradient_norm_group())  # pipeline: every layer's load
            while self.state.step < self.steps:
                step_start = time.perf_counter()
                outcome = runner.run(self.state)
                self._book(outcome, bar)
                validation = self.validator() if self.eval_every and (self.state.step + 1) % self.eval_every == 0 \
                    else None
                reporter.report(step=self.state.step, outcome=outcome, loss=self.state.losses[-1],
                                lr=runner.optimizer.param_groups[0]["lr"], tokens=self.state.tokens,
                                seconds=time.perf_counter() - step_start, validation=validation)
                self.state.step += 1
                self._save_or_stop(outcome, stop.agreed(runner.device))
            return LoopEnd(validation=validation, tokens_per_second=bar.tokens_per_second,
                           console=bar.console if self.progress is not None else None)

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
                                                   data=self.runner.data))
        if signum:
            if checkpoint is not None:
                checkpoint.wait()
            raise RunInterrupted(interrupted_message(signum, state.step, self.steps, saved), signum=signum)
