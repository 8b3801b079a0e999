"""An allocator failure during training, turned into advice naming the switches that reduce memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def explain_out_of_memory() -> Iterator[None]:
    """Re-raise an out-of-memory error (torch's, the CPU allocator's) as a `MemoryError` that
    names the settings that lower the peak; any other error passes through unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        text = str(err)
        if not (isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
                or "can't allocate memory" in text):
            raise
        raise MemoryError(
            f"the run ran out of memory ({text.splitlines()[0][:200]}). Switches that reduce it: "
            f"model.layers[*].checkpoint_activations=True (recompute activations in the backward); "
            f"step.micro_batch_size=<smaller> (the step keeps batch_size through gradient accumulation); a smaller "
            f"seq_len; precision=@bf16; a sharding parallel plan across more processes") from err
