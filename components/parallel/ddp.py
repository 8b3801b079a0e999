"""Replicated data parallelism with torch's DistributedDataParallel: every process holds the
whole model and its gradients are all-reduced (or compressed by a communication hook) while
the backward pass still runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tessera.components.interfaces import CommHook
from tessera.components.parallel.process_group import average_in_place

Losses = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class _Call(nn.Module):
    """The module DDP wraps: `forward(fn, batch)` returns `fn(batch)`. The trainer's forward is
    `model.losses`, not `model.forward`; calling it through DDP's `__call__` is what lets DDP
    prepare its reducer for the backward that follows (and skip it under `no_sync`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Losses, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fn(batch)


def wrap(model: nn.Module, process_group: Any, comm_hook: CommHook | None,
         ignore: set[nn.Parameter] | None = None) -> DistributedDataParallel:
    """DDP over `model`'s parameters (the model itself is not replaced: the trainer, the
    checkpoint and the evaluation keep using it), with `comm_hook` registered if given.

    Buffers are synchronised once, at construction, not before each forward (DDP's default):
    every buffer the model has is either constant or kept identical on all ranks by
    construction (MoE router biases update from all-reduced expert loads), and some
    accumulate during the forward (expert load counts), which a broadcast from rank 0 would
    overwrite.

    `ignore`: parameters DDP leaves alone (routed experts under expert parallelism, whose
    gradients `tessera.components.moe.expert_parallel` reduces itself)."""
    call = _Call(model)
    if ignore:
        names = [f"model.{name}" for name, param in model.named_parameters() if param in ignore]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(call, names)
    ddp = DistributedDataParallel(call, process_group=process_group, forward_sync_buffers=False)
    if comm_hook is not None:
        comm_hook.register(ddp, process_group)
    return ddp


def forward_backward(ddp: DistributedDataParallel, micro_batches: Iterable[dict[str, torch.Tensor]], *,
                     n_micro: int, losses: Losses, backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
    """`ParallelPlan.forward_backward` through DDP: gradients accumulate locally (`no_sync`)
    for all but the last micro-batch, whose backward all-reduces the accumulated sum."""
    totals: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == n_micro - 1
        with contextlib.nullcontext() if last else ddp.no_sync():  # the forward decides, so both go inside
            terms = ddp(losses, batch)
            backward(torch.stack(list(terms.values())).sum() / n_micro)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.item() / n_micro
    return totals


def average_gradients(params: Iterable[nn.Parameter], process_group: Any) -> None:
    """Average the `.grad` of `params` (plain tensors, identical across `process_group` in
    shape) over `process_group`: what DDP does for a model it cannot wrap (pipeline stages run
    by a schedule, which calls the stages' backward itself)."""
    average_in_place((p.grad for p in params if p.grad is not None), process_group)
