"""A trial training step: forward and backward on real micro-batches of a given size, to
measure the step's peak memory before the run's first step, leaving nothing behind.

What it leaves untouched, so the run that follows is the run a hand-set micro-batch gives:
the weights (no optimizer step), the gradients (discarded), the buffers (restored: routers
count their load in the forward), every RNG (forked: dropout draws), and the data's position
(its batches are drawn with a generator of their own; stateful data is rewound).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from torch import nn

from tessera.components.interfaces import ParallelPlan, PrecisionPolicy, StatefulData, TrainingData
from tessera.components.train.live_bytes import PeakLiveBytes
from tessera.components.train.out_of_memory import is_out_of_memory

TRIAL_SEED = 0x5EED
"""The trial batches' generator seed (any: the trial's batches never reach the run)."""


def trial_peak(model: nn.Module, *, parallel: ParallelPlan, precision: PrecisionPolicy, data: TrainingData,
               micro: int, n_micro: int, seq_len: int, device: str) -> int | None:
    """Peak bytes this process's tensors reach over one step of `n_micro` micro-batches of
    [`micro`, `seq_len`] tokens, without the optimizer state (allocated by the first update,
    added by the caller); None when the allocator ran out of memory.

    At most two micro-batches run: from the second on, a micro-batch's forward runs beside
    the gradients accumulated so far, and each later one repeats it. CUDA: the allocator's
    peak; CPU: weights and buffers as held plus the most bytes of tensors alive at once
    (`PeakLiveBytes`). Errors other than out-of-memory pass through."""
    cuda = torch.device(device).type == "cuda"
    with _leaves_no_trace(model, data, device):
        try:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                _forward_backward(model, parallel, precision, data, micro, min(2, n_micro), seq_len, device)
                return torch.cuda.max_memory_allocated(device)
            with PeakLiveBytes(held=[*model.parameters(), *model.buffers()]) as counter:
                _forward_backward(model, parallel, precision, data, micro, min(2, n_micro), seq_len, device)
            return counter.peak
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            return None


def _forward_backward(model: nn.Module, parallel: ParallelPlan, precision: PrecisionPolicy, data: TrainingData,
                      micro: int, n_micro: int, seq_len: int, device: str) -> None:
    """The step's passes as `StepRunner` runs them (the plan's accumulation, the policy's
    autocast), on batches of the trial's own, with compiled blocks run eagerly."""
    generator = torch.Generator().manual_seed(TRIAL_SEED)
    autocast = precision.autocast(torch.device(device).type)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(n_micro):
            batch = data.batch("train", batch_size=micro, seq_len=seq_len, generator=generator)
            yield {k: v.to(device) for k, v in batch.items()}

    def losses(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast:
            return model.losses(batch["tokens"], batch["targets"], doc_ids=batch["doc_ids"])

    # eager even for compiled blocks: a trial shape must not leave a compiled graph behind (the
    # run compiles its own shape once); eager usually saves at least what inductor's graphs save
    with torch.compiler.set_stance("force_eager"):
        parallel.forward_backward(model, batches(), n_micro=n_micro, losses=losses,
                                  backward=lambda loss: loss.backward())


@contextlib.contextmanager
def _leaves_no_trace(model: nn.Module, data: TrainingData, device: str) -> Iterator[None]:
    """Fork the RNGs, then restore the buffers and the data's position and drop the gradients
    and whatever the trial left for the garbage collector (a failed trial's activations)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    position = data.state_dict() if isinstance(data, StatefulData) else None
    cuda = torch.device(device).type == "cuda"
    forked = [torch.device(device).index or torch.cuda.current_device()] if cuda else []
    try:
        with torch.random.fork_rng(devices=forked, device_type="cuda"):
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        if position is not None:
            data.load_state_dict(position)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
