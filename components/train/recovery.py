"""What happens after the stability guard rejects a step: wait, roll back, or stop the run.

A rejected step changed nothing (its gradients were dropped). After `guard.max_bad_steps` in
a row the run returns to the last checkpoint it wrote or loaded; when it may not (no
checkpoint, rollback off, or too many rollbacks already) it stops with `TrainingDiverged`,
naming the step, what went non-finite and what to try.
"""

from __future__ import annotations

import torch

from tessera.components.interfaces import PrecisionPolicy, Schedule
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.divergence import divergence_message, first_nonfinite_weight
from tessera.components.train.guard import StabilityGuard, TrainingDiverged
from tessera.components.train.run_state import RunState
from tessera.components.train.step import StepOutcome


def after_rejected_step(outcome: StepOutcome, *, state: RunState, guard: StabilityGuard,
                        checkpoint: Checkpointer | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Schedule, base_lr: float, grad_clip: float | None,
                        precision: PrecisionPolicy) -> str | None:
    """Count the rejected step `state.step`; roll back when the guard's patience is spent.
    Returns a note to print when it rolled back; raises `TrainingDiverged` when it cannot."""
    state.record("skipped_guard", state.step)
    if not guard.exhausted:
        return None
    can_roll_back = checkpoint is not None and checkpoint.last is not None
    if not (guard.may_roll_back and can_roll_back):
        if guard.rollbacks:
            after = f"after {guard.rollbacks} rollbacks to the last checkpoint (the most allowed)"
        elif guard.rollback and guard.max_rollbacks > 0:
            after = "and no checkpoint of this run to roll back to"
        else:
            after = "and rollback is off"
        raise TrainingDiverged(divergence_message(
            step=state.step + 1, reason=guard.reason, terms=outcome.terms, first_bad_grad=outcome.first_bad_grad,
            first_bad_weight=first_nonfinite_weight(model),
            stopped_because=f"stopped after {guard.consecutive_bad} bad steps in a row {after}",
            lr=base_lr, warmup_steps=getattr(scheduler, "warmup_steps", None), grad_clip=grad_clip,
            compute_dtype=precision.compute_dtype))
    # Weights and optimizer go back; the data position does not, so the offending batches are
    # skipped rather than replayed.
    checkpoint.load(checkpoint.last, model=model, optimizer=optimizer)
    guard.rollbacks += 1
    guard.consecutive_bad = 0
    state.record("rollbacks", state.step)
    return (f"note: step {state.step + 1}: {guard.reason}; {guard.max_bad_steps} bad steps in a row: rolled back "
            f"to {checkpoint.last}")
