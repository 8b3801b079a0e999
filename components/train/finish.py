"""The end of a run: the last checkpoint written out, the final validation, the verdict on a
model whose validation loss is not finite, the summary (metrics, plots, the closing line),
and the `TrainResult` the caller gets.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NoReturn

import torch

from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.divergence import divergence_message, first_nonfinite_weight
from tessera.components.train.guard import TrainingDiverged
from tessera.components.train.loop import LoopEnd
from tessera.components.train.metrics import Metrics
from tessera.components.train.run_state import RunState
from tessera.components.train.step import StepRunner
from tessera.components.train.validation import Validator


@dataclasses.dataclass
class TrainResult:
    """What a run measured (per-step LM loss and every loss term, final validation loss,
    throughput) and the trained model."""

    losses: list[float]
    terms: dict[str, list[float]]
    model: torch.nn.Module
    val_loss: float
    tokens_per_second: float
    seconds: float


def finish(*, end: LoopEnd, runner: StepRunner, state: RunState, steps: int, start_step: int, validator: Validator,
           checkpoint: Checkpointer | None, metrics: Metrics | None, precision_note: str,
           started: float) -> TrainResult:
    """Close the run that `started` (a `time.perf_counter()` reading) at `start_step` and
    ended as `end` says. Validates the final model unless the last step just did; raises
    `TrainingDiverged` when its validation loss is not finite (with the guard off, or a model
    finite in training but not in evaluation)."""
    if checkpoint is not None:
        checkpoint.wait()
    losses = state.losses
    validation = end.validation
    validated_at_end = start_step < steps and validation is not None  # the last step just validated
    if not validated_at_end:
        validation = validator()
    val_loss = validation["val_loss"]
    if not math.isfinite(val_loss):
        _refuse_unusable(runner, steps=steps, val_loss=val_loss, last_loss=losses[-1] if losses else float("nan"))
    seconds = time.perf_counter() - started
    if metrics is not None:
        if not validated_at_end:
            metrics.log(steps, {"loss": losses[-1] if losses else None, **validation})
        metrics.finish(seconds=seconds, tokens=state.tokens, console=end.console,
                       extra=_summary(metrics, state, validation, precision_note))
    if end.console is not None:
        end.console.print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} (val {val_loss:.4f}) in {steps} steps, "
                          f"{seconds:.1f} s, {end.tokens_per_second:,.0f} tok/s", highlight=False)
    return TrainResult(losses=list(losses), terms=state.history, model=runner.model, val_loss=val_loss,
                       tokens_per_second=end.tokens_per_second, seconds=seconds)


def _summary(metrics: Metrics, state: RunState, validation: dict[str, float], precision_note: str) -> dict[str, Any]:
    """The run's own lines of the summary (besides time, tokens and energy, which `Metrics` adds)."""
    losses, history = state.losses, state.history
    mfus = [r["mfu"] for r in metrics.rows if r.get("mfu") is not None]
    return {"precision": precision_note, "final_loss": losses[-1] if losses else None, **validation,
            "mean_mfu": sum(mfus) / max(1, len(mfus)),
            "skipped_steps": len(history.get("skipped_guard", [])) + len(history.get("skipped_overflow", [])),
            "rollbacks": len(history.get("rollbacks", []))}


def _refuse_unusable(runner: StepRunner, *, steps: int, val_loss: float, last_loss: float) -> NoReturn:
    """`TrainingDiverged` for a model whose final validation loss is `val_loss` (not finite)."""
    raise TrainingDiverged(divergence_message(
        step=steps, reason=f"the final validation loss is {val_loss} (last training loss {last_loss:.4g})",
        terms={}, first_bad_grad=None, first_bad_weight=first_nonfinite_weight(runner.model),
        stopped_because="the run is over and its model is unusable", lr=runner.base_lrs[0],
        warmup_steps=getattr(runner.scheduler, "warmup_steps", None), grad_clip=runner.options.grad_clip,
        compute_dtype=runner.precision.compute_dtype))
