"""State that differs between the processes of a group (a compression hook's error feedback,
one replica's view of DiLoCo's outer step), stored in a checkpoint as one tensor per entry.

A checkpoint keeps a plain tensor once (it is taken to be the same on every process), so each
process's own tensor becomes row `rank` of a tensor of shape (group size, *shape), sharded
over the group (a DTensor, `Shard(0)`): every process writes its own row, and on loading each
takes its row back. Values that are not tensors are kept as given (rank 0's are saved: they
must be the same on every process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

__all__ = ["RankStateError", "own_rows", "stack_over_ranks"]


class RankStateError(ValueError):
    """A checkpoint's per-process state was written by a different number of processes."""


def _rank_and_size(group: Any) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def stack_over_ranks(tree: Any, group: Any) -> Any:
    """`tree` (nested dicts / lists) with each tensor `t` of this process replaced by its row
    of the group-wide tensor (group size, *t.shape): a DTensor sharded on dim 0 in a group of
    several processes, `t[None]` in one."""
    rank, size = _rank_and_size(group)
    mesh = None

    def walk(value: Any) -> Any:
        nonlocal mesh
        if isinstance(value, torch.Tensor):
            row = value.detach().clone().unsqueeze(0)  # its own storage: a file never holds one tensor twice
            if size == 1:
                return row
            if mesh is None:
                mesh = DeviceMesh.from_group(group, device_type=value.device.type)
            return DTensor.from_local(row, mesh, [Shard(0)], run_check=False)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return walk(tree)


def own_rows(tree: Any, group: Any, *, what: str) -> Any:
    """The inverse of `stack_over_ranks` on a loaded tree (whole tensors, shape (group size,
    ...)): each replaced by this process's row. `what` names the state in the error raised
    when the checkpoint was written by another number of processes."""
    rank, size = _rank_and_size(group)

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if full.dim() == 0 or full.shape[0] != size:
                raise RankStateError(
                    f"the checkpoint's {what} was written by {full.shape[0] if full.dim() else 1} processes and this "
                    f"run has {size}: it is kept per process, so resume on "
                    f"{full.shape[0] if full.dim() else 1} processes")
            return full[rank].clone()
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(tree)
