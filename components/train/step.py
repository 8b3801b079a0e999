"""One optimizer step: schedule, forward/backward over micro-batches, clip, judge, update.

The parallel plan owns the forward and backward passes over the step's micro-batches (plain
gradient accumulation by default, a pipeline schedule under pipeline parallelism) and the
averaging of the loss terms over data-parallel processes; this file owns everything around
them. What happens to a step the guard rejects is `tessera.components.train.recovery`'s job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tessera.components.interfaces import (
    HessianEstimateOptimizer,
    OptimizerStepHook,
    ParallelPlan,
    PrecisionPolicy,
    Schedule,
    SecondOrderOptimizer,
    TrainingData,
)
from tessera.components.model.decoder import DecoderLM, cross_entropy
from tessera.components.model.softmax_cross_entropy import twice_differentiable
from tessera.components.train.collective_record import note_collectives
from tessera.components.train.divergence import clip_gradients
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.run_state import RunState
from tessera.components.train.step_options import StepOptions


@dataclasses.dataclass
class StepOutcome:
    """What one step did. `terms`: each loss term, averaged over the whole batch (all
    data-parallel processes); `update`: whether the optimizer stepped (False when the guard
    rejected the step); `first_bad_grad`: the first parameter with a non-finite gradient."""

    terms: dict[str, float]
    grad_norm: float
    update: bool
    first_bad_grad: str | None
    sequences: int


@dataclasses.dataclass(kw_only=True)
class StepRunner:
    """Runs training steps of `model` with `optimizer` (already wrapped by the precision
    policy; `raw_optimizer` is the optimizer before wrapping, whose capabilities decide
    second-order backward passes and Hessian estimates), as `options` say (micro-batches,
    batch ramp, clipping, scheduled values)."""

    model: DecoderLM
    optimizer: torch.optim.Optimizer
    raw_optimizer: torch.optim.Optimizer
    parallel: ParallelPlan
    precision: PrecisionPolicy
    data: TrainingData
    scheduler: Schedule
    options: StepOptions
    guard: StabilityGuard | None
    batch_size: int
    """Sequences per step over all data-parallel processes (before a batch ramp)."""
    micro_batch_size: int
    """Sequences per forward/backward on each process (resolved: never None)."""
    seq_len: int
    data_parallel_size: int
    """Processes reading different data (the data-parallel degree)."""
    device: str

    def __post_init__(self) -> None:
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.named_params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.step_hooks = [m for m in self.model.modules() if isinstance(m, OptimizerStepHook)]
        device_type = torch.device(self.device).type
        self.autocast = self.precision.autocast(device_type)
        self.scaler = self.precision.grad_scaler(device_type)

    def sequences(self, tokens: int) -> int:
        """Sequences in the step that starts after `tokens` training tokens (batch ramps grow it)."""
        ramp = self.options.batch_ramp
        if ramp is None:
            return self.batch_size
        return ramp.batch_size(tokens, full_batch=self.batch_size,
                               micro_batch=self.micro_batch_size * self.data_parallel_size)

    def run(self, state: RunState) -> StepOutcome:
        """Take step `state.step` (0-based); `state` is not advanced here."""
        multiplier = self.scheduler(state.step, state.tokens)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * multiplier
        for name, schedule in (self.options.scheduled or {}).items():
            set_everywhere(self.model, name, schedule(state.step, state.tokens))
        sequences = self.sequences(state.tokens)
        n_micro = sequences // (self.micro_batch_size * self.data_parallel_size)  # on each process
        # Optimizers that differentiate the gradients (Sophia-H's Hutchinson estimate) need
        # their graph, and attention whose backward is differentiable (SDPA's math kernel).
        second_order = isinstance(self.raw_optimizer, SecondOrderOptimizer) and \
            self.raw_optimizer.wants_second_order()
        last_batch: dict[str, torch.Tensor] = {}

        def micro_batches() -> Iterator[dict[str, torch.Tensor]]:
            for _ in range(n_micro):
                batch = self.data.batch("train", batch_size=self.micro_batch_size, seq_len=self.seq_len,
                                        generator=state.generator)
                last_batch.update({k: v.to(self.device) for k, v in batch.items()})
                yield dict(last_batch)

        def losses(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            kernel = sdpa_kernel(SDPBackend.MATH) if second_order else contextlib.nullcontext()
            loss = twice_differentiable() if second_order else contextlib.nullcontext()
            with self.autocast, kernel, loss:
                return self.model.losses(batch["tokens"], batch["targets"], doc_ids=batch["doc_ids"])

        def backward(loss: torch.Tensor) -> None:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward(create_graph=second_order)

        # the plan's gradient collectives may run in C++ (DDP), out of the watchdog's record
        note_collectives("forward_backward")
        terms = self.parallel.forward_backward(self.model, micro_batches(), n_micro=n_micro, losses=losses,
                                               backward=backward)
        # report (and let the guard judge) the loss of the whole batch, on every process
        terms = self.parallel.mean_over_data_parallel(terms, self.device)
        update, grad_norm, first_bad_grad = self._update(terms, state)
        if update and isinstance(self.raw_optimizer, HessianEstimateOptimizer) and \
                state.step % self.raw_optimizer.hessian_interval == 0:
            self._gnb_hessian(last_batch)
        return StepOutcome(terms=terms, grad_norm=grad_norm, update=update, first_bad_grad=first_bad_grad,
                           sequences=sequences)

    def _update(self, terms: dict[str, float], state: RunState) -> tuple[bool, float, str | None]:
        """Clip, let the guard judge, step the optimizer (through the loss scaler), run the
        after-step hooks and clear the gradients. Returns (updated, grad norm, first bad grad)."""
        opt, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.unscale_(opt)  # clip and judge the true gradients
        norm, first_bad_grad = clip_gradients(self.named_params, self.options.grad_clip,
                                              sum_over=self.parallel.gradient_norm_group())
        grad_norm = norm.item()
        overflow = scaler is not None and not math.isfinite(grad_norm)  # the scaler's to handle
        update = self.guard.check(sum(terms.values()), grad_norm) if self.guard is not None and not overflow else True
        if scaler is not None:
            scale_before = scaler.get_scale()
            if update:
                scaler.step(opt)  # skips the step itself when gradients hold inf/nan
            scaler.update()
            if scaler.get_scale() < scale_before:
                state.record("skipped_overflow", state.step)
        elif update:
            opt.step()
        if update:
            for hook in self.step_hooks:
                hook.after_optimizer_step()
            self.parallel.after_optimizer_step(self.model, state.step + 1)
        opt.zero_grad(set_to_none=True)
        return update, grad_norm, first_bad_grad

    def _gnb_hessian(self, batch: dict[str, torch.Tensor]) -> None:
        """Sophia's Gauss-Newton-Bartlett estimate: backprop the loss on labels sampled from the
        model's own predictions, then let the optimizer fold the squared gradients in."""
        with self.autocast:
            logits = self.model(batch["tokens"], doc_ids=batch["doc_ids"])
        sampled = torch.distributions.Categorical(logits=logits.detach().float()).sample()
        cross_entropy(logits, sampled).backward()
        self.optimizer.update_hessian(batch["tokens"].numel())  # tokens the mean loss averages over
        self.optimizer.zero_grad(set_to_none=True)


def set_everywhere(model: torch.nn.Module, name: str, value: Any) -> None:
    """Set attribute `name` to `value` on every module of `model` that has it."""
    found = False
    for module in model.modules():
        if hasattr(module, name) and not isinstance(getattr(module, name), (torch.Tensor, torch.nn.Module)):
            setattr(module, name, value)
            found = True
    if not found:
        raise ValueError(f"scheduled value {name!r}: no module of the model has this attribute")
