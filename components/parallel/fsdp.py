"""Fully sharded data parallel (FSDP2) over all processes: `parallel=@fsdp` is
`parallel=@mesh(dp_shard=-1)`, sharded even in a single process."""

from __future__ import annotations

import torch

from tessera.components.parallel.mesh import Mesh
from tessera.registry.kinds import PARALLEL_PLAN


@PARALLEL_PLAN.register("fsdp")
class FullyShardedDataParallel(Mesh):
    """Shards each transformer block (and each MTP module's block) as one FSDP unit and the
    rest (embedding, norms, head, MTP projections) as the root unit, on a 1-D mesh over all
    processes: every process holds 1/N of each parameter, gradient and optimizer state, and
    trains on 1/N of each batch.

    Launch with `torchrun --nproc-per-node N recipes/<recipe>.py ... parallel=@fsdp` (add
    `device=cuda` on GPUs: each process then uses GPU LOCAL_RANK); a plain `python` run is a
    group of one (still sharded, so its checkpoints and FSDP mixed precision are those of any
    other process count). The run's `batch_size` stays the global number of sequences per
    step; each rank trains on its 1/N share (the data loader hands ranks disjoint sequences
    of one stream), and gradients are averaged across ranks, so N processes step exactly as
    one process with the whole batch would (up to summation order).

    `reshard_after_forward`: free the gathered parameters after each block's forward
    (ZeRO-3; least memory) or keep them until the backward (ZeRO-2-like; less communication).
    `reduce_dtype`: dtype gradients are reduced in (None: the parameters' dtype).
    """

    shard_alone = True

    def __init__(self, *, reshard_after_forward: bool = True, reduce_dtype: torch.dtype | None = None):
        super().__init__(dp_shard=-1, reshard_after_forward=reshard_after_forward, reduce_dtype=reduce_dtype)
