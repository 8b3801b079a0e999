"""An allocator failure during training: how one looks (`is_out_of_memory`), and the advice
naming the switches that reduce memory (`explain_out_of_memory`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocator failure: torch's `OutOfMemoryError` (CUDA), Python's
    `MemoryError`, or a RuntimeError whose text says the CPU allocator could not allocate."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def explain_out_of_memory() -> Iterator[None]:
    """Re-raise an out-of-memory error (torch's, the CPU allocator's) as a `MemoryError` that
    names the settings that lower the peak; any other error passes through unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise MemoryError(
            f"the run ran out of memory ({str(err).splitlines()[0][:200]}). Switches that reduce it: "
            f"model.layers[*].checkpoint_activations=True (recompute activations in the backward); "
            f"step.micro_batch_size=<smaller> or auto (the step keeps batch_size through gradient accumulation); "
            f"a smaller seq_len; precision=@bf16; a sharding parallel plan across more processes") from err
