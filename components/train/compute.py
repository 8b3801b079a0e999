"""How a run computes: the speed and memory switches that leave its numbers unchanged (up to
floating-point summation order): torch threads, per-block compilation, activation checkpointing,
how freed host memory is kept.

A recipe sets it as `compute=fdl.Config(Compute, compile=True)`; on the command line
`compute.threads=1`, `compute.activation_checkpointing=full`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from tessera.components.model.decoder import DecoderLM
from tessera.components.train import cpu_memory
from tessera.registry.invariants import invariant


@invariant("threads is None or threads >= 1", lambda threads: threads is None or threads >= 1,
           fix="use at least one thread, or None for torch's default")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Compute:
    """Speed and memory switches of a run.

    Args:
        compile: torch.compile each block (the first steps compile; 1.1-1.8x faster after); a
            string names the backend instead of inductor (e.g. "aot_eager": tracing only,
            quick to check).
        activation_checkpointing: recompute every block ("full") or every attention sublayer
            ("selective") in the backward pass instead of storing activations.
        threads: torch intra-op threads (None leaves torch's default).
        keep_freed_memory: keep the host memory a step frees for the next step instead of
            handing it back to the kernel and faulting it in again (glibc on Linux;
            `tessera.components.train.cpu_memory`): faster CPU steps, resident memory
            staying at its peak between steps.
    """

    compile: bool | str = False
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    threads: int | None = None
    keep_freed_memory: bool = True

    def set_up_process(self) -> None:
        """Give torch `threads` intra-op threads and set the allocator (first, before any work is timed)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.keep_freed_memory:
            cpu_memory.keep_freed_memory()

    def apply(self, model: DecoderLM) -> None:
        """Switch activation checkpointing and compilation on for every block of `model` (its
        final weights in place, before the plan's `ready` and the optimizer)."""
        for block in model.blocks():
            if self.activation_checkpointing != "none":
                block.checkpoint_activations = True if self.activation_checkpointing == "full" else "attention"
            if self.compile:  # static shapes: a micro-batch keeps its shape all run (MTP's T-1 is one more graph)
                block.compile(dynamic=False, **({} if self.compile is True else {"backend": self.compile}))
