"""What every optimizer step does around its forward and backward passes: how the step's
batch is cut into micro-batches and grown, how its gradients are clipped, which parameters
weight decay reaches, and which model values follow a schedule.

A recipe sets it as `step=fdl.Config(StepOptions, grad_clip=1.0, ...)`; on the command line
`step.grad_clip=0.5`, `step.micro_batch_size=2` (or `auto`: the largest that fits the memory,
`step.memory_limit=4GB` to cap it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from tessera.components.interfaces import Schedule
from tessera.components.train.batch_ramp import BatchRamp
from tessera.components.train.memory_budget import is_size
from tessera.registry.invariants import invariant


@invariant("grad_clip is None or grad_clip > 0", lambda grad_clip: grad_clip is None or grad_clip > 0,
           fix="set step.grad_clip to a positive max norm, or None to disable clipping")
@invariant("micro_batch_size is None, 'auto' or >= 1",
           lambda micro_batch_size: micro_batch_size in (None, "auto") or micro_batch_size >= 1,
           fix="use at least one sequence per micro-batch, None for each process's whole share, or auto for the "
               "largest that fits the memory")
@invariant("memory_limit is None or a size such as 4GB",
           lambda memory_limit: memory_limit is None or is_size(memory_limit),
           fix="write step.memory_limit as a positive number with a unit, e.g. 4GB or 512MiB")
@invariant("memory_limit is set only with micro_batch_size='auto'",
           lambda micro_batch_size, memory_limit: memory_limit is None or micro_batch_size == "auto",
           fix="set step.micro_batch_size=auto to size the micro-batch within step.memory_limit, or drop the limit")
@dataclasses.dataclass(frozen=True, kw_only=True)
class StepOptions:
    """How each optimizer step is taken.

    Args:
        micro_batch_size: sequences per forward/backward on each process; a step accumulates
            batch_size / (micro_batch_size x data-parallel processes) of them (None: each
            process's whole share at once). `batch_size` is global: N data-parallel processes
            train on 1/N each. "auto": the largest divisor of each process's share whose step
            fits the memory (planned by the `--dry-run` planner, confirmed by a trial step
            before the first; `tessera.components.train.auto_micro_batch`).
        memory_limit: bytes one process's step may hold, for `micro_batch_size="auto"`: a size
            such as "4GB" or "512MiB" (powers of 1000; KiB/MiB/GiB powers of 1024) or an int;
            None: what the device has free (a GPU's free memory with a margin; on CPU the
            cgroup limit or MemAvailable).
        batch_ramp: grow the sequences per step from a smaller start (DeepSeek-V2/V3).
        grad_clip: max global gradient norm (the pre-clip norm is reported); None: no clipping.
        scheduled: attribute name -> schedule of its value, set before every step on each
            module of the model that has the attribute (e.g. "mtp_loss_weight",
            "bias_update_speed"); None: none.
        decay_embeddings, decay_norms_and_biases: apply the optimizer's weight decay to the
            embeddings and output head / to norm weights and biases too (off by default).
    """

    micro_batch_size: int | Literal["auto"] | None = None
    memory_limit: str | int | None = None
    batch_ramp: BatchRamp | None = None
    grad_clip: float | None = 1.0
    scheduled: dict[str, Schedule] | None = None
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
