"""Bytes a process hands to torch.distributed, by collective kind, counted at the dispatcher.

Every collective and point-to-point call, whether it comes from Python (`dist.all_reduce`,
`dist.isend` inside `batch_isend_irecv`, `dist.all_to_all_single`), from DTensor's functional
collectives (tensor parallelism, FSDP2's DTensor parameters) or from C++ (a `ProcessGroup`
method reached from the pipeline's `P2POp`s), reaches the dispatcher as a `c10d::` or
`_c10d_functional::` operator. `CommCounter`, a `TorchDispatchMode`, sees each of them once:
while a mode runs an operator it is popped from the mode stack, so the backend calls made
inside a functional collective are not counted a second time. Operators on DTensors are
handed back to DTensor (`NotImplemented`), whose own local collectives then come through the
mode, the way torch's `CommDebugMode` does it.

Bytes follow the planner's convention (`components/train/comm_volume.py`) so the two can be
put side by side: an all-reduce counts its tensor, an all-gather its gathered output, a
reduce-scatter its whole input, an all-to-all the rows that leave the process (its own slice
stays), point-to-point what the process sends (receives are the peer's sends), a broadcast
its tensor on the source only. `sent_all_gather` keeps an all-gather's input too (what the
data-parallel table of `parallel_scaling.py` counts).

The mode costs a Python call per operator, so time steps without it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "point-to-point", "broadcast", "other")
NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor")


def _nbytes(tensors: Any) -> int:
    """Bytes of a tensor or a (nested) list of tensors."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, list | tuple):
        return sum(_nbytes(t) for t in tensors)
    return 0


def _group(group: Any) -> Any:
    """The `ProcessGroup` behind a boxed c10d group (c10d ops) or a group name (functional ops)."""
    if isinstance(group, torch.ScriptObject):
        return dist.ProcessGroup.unbox(group)
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group)
    return group


def _leaving(tensor: torch.Tensor, input_splits: list[int], group: Any) -> int:
    """Bytes of an all-to-all's input that go to other processes (the own slice stays)."""
    group = _group(group)
    rows = tensor.shape[0] if tensor.dim() else 1
    row_bytes = (tensor.numel() // max(1, rows)) * tensor.element_size()
    splits = [int(s) for s in input_splits] or [rows // group.size()] * group.size()  # []: equal splits
    return (rows - splits[group.rank()]) * row_bytes


def _count(namespace: str, name: str, args: tuple, kwargs: dict) -> tuple[str, int, int]:
    """(kind, bytes by the planner's convention, bytes the process hands over) of operator
    `namespace::name`."""
    a = list(args) + list(kwargs.values())
    if name in ("allreduce_", "allreduce_coalesced_", "all_reduce", "all_reduce_", "all_reduce_coalesced",
                "all_reduce_coalesced_"):
        n = _nbytes(a[0])
        return "all-reduce", n, n
    if name in ("allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_", "allgather_coalesced_"):
        return "all-gather", _nbytes(a[0]), _nbytes(a[1])
    if name in ("all_gather_into_tensor", "all_gather_into_tensor_coalesced", "all_gather_into_tensor_out"):
        n = _nbytes(a[0])
        return "all-gather", n * int(a[1]), n
    if name in ("reduce_scatter_", "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        n = _nbytes(a[1])
        return "reduce-scatter", n, n
    if name in ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "reduce_scatter_tensor_out"):
        n = _nbytes(a[0])
        return "reduce-scatter", n, n
    if name == "alltoall_base_":
        n = _leaving(a[1], list(a[4]), a[2])
        return "all-to-all", n, _nbytes(a[1])
    if name == "all_to_all_single":
        n = _leaving(a[0], list(a[2]), a[3])
        return "all-to-all", n, _nbytes(a[0])
    if name == "alltoall_":
        return "all-to-all", _nbytes(a[1]), _nbytes(a[1])
    if name == "shard_dim_alltoall":
        return "all-to-all", _nbytes(a[0]), _nbytes(a[0])
    if name in ("send", "isend"):
        n = _nbytes(a[0])
        return "point-to-point", n, n
    if name == "batch_p2p_ops":
        n = sum(_nbytes(t) for op, t in zip(a[0], a[3], strict=True) if "send" in op)
        return "point-to-point", n, n
    if namespace == "c10d" and name == "broadcast_":  # (tensors, group, root_rank, ...)
        n = _nbytes(a[0]) if a[2] == _group(a[1]).rank() else 0
        return "broadcast", n, n
    if name in ("broadcast", "broadcast_"):  # functional: (input, src, group_name)
        n = _nbytes(a[0]) if a[1] == _group(a[2]).rank() else 0
        return "broadcast", n, n
    if name in ("recv_", "recv_any_source_", "irecv", "barrier", "monitored_barrier_", "wait_tensor",
                "_wrap_tensor_autograd", "check_for_nan", "mesh_get_process_group"):
        return "other", 0, 0
    n = _nbytes(a[0]) if isinstance(a[0], torch.Tensor) else 0
    return "other", n, n


class CommCounter(TorchDispatchMode):
    """While active, adds the bytes of every collective this process calls to `bytes[kind]`
    (planner's convention, see the module docstring), `calls[kind]`, and `sent_all_gather`
    (all-gather inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.bytes = dict.fromkeys(KINDS, 0)
        self.calls = dict.fromkeys(KINDS, 0)
        self.sent_all_gather = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor decomposes it; its local collectives come back here
        if func.namespace in NAMESPACES:
            kind, planned, handed = _count(func.namespace, func._schema.name.split("::")[1], args, kwargs)
            self.bytes[kind] += planned
            self.calls[kind] += 1
            if kind == "all-gather":
                self.sent_all_gather += handed
        return func(*args, **kwargs)
