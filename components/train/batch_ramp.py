"""Batch-size ramp (DeepSeek-V2/V3): sequences per optimizer step grow over the first tokens."""

from __future__ import annotations

from tessera.registry.invariants import invariant


@invariant("start_batch >= 1 and ramp_tokens > 0",
           lambda start_batch, ramp_tokens: start_batch >= 1 and ramp_tokens > 0,
           fix="start from at least one sequence and ramp over a positive number of tokens")
class BatchRamp:
    """Sequences per step rise linearly from `start_batch` to the run's batch size over the first
    `ramp_tokens` tokens (the papers do not state the ramp's shape; linear is assumed), in whole
    micro-batches so each step is a whole number of accumulated forward/backward passes.

    V3: 3072 -> 15360 sequences over 469B tokens. V2: 2304 -> 9216 over 225B.
    """

    def __init__(self, *, start_batch: int, ramp_tokens: float):
        self.start_batch = start_batch
        self.ramp_tokens = ramp_tokens

    def batch_size(self, tokens: int, *, full_batch: int, micro_batch: int) -> int:
        """Sequences for the step that starts after `tokens` tokens (a multiple of `micro_batch`)."""
        fraction = min(1.0, tokens / self.ramp_tokens)
        size = self.start_batch + (full_batch - self.start_batch) * fraction
        return max(micro_batch, int(size) // micro_batch * micro_batch)
