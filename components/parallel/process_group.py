"""Joining the run's process group (torchrun sets the environment; a lone process makes its own)."""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from tessera.components.parallel.slurm_env import torch_env_from_slurm


def ensure_process_group(device: str = "cpu") -> None:
    """Initialise the default process group once, for the device the run trains on: gloo for
    `device="cpu"`; for a GPU device, NCCL for GPU tensors plus gloo for CPU tensors (object
    broadcasts, CPU-side counters), with this process bound to GPU LOCAL_RANK. A machine's
    GPUs are never used unless `device` asks for them.

    Under `torchrun --nproc-per-node N` the rank and rendezvous come from its environment
    variables (under `srun` alone, from SLURM's: see `slurm_env`); a plain `python` process
    (tests, debugging) becomes a group of one.
    """
    if dist.is_initialized():
        return
    os.environ.update(torch_env_from_slurm(os.environ))  # srun with no torchrun: ranks from SLURM_* ({} else)
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for a group of one
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" now means this rank's GPU
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(_destroy)  # an undestroyed gloo group can abort the interpreter at exit


def leave_process_group() -> None:
    """End of a successful run: wait for every rank, then tear the group down while the
    interpreter is still whole (a rank tearing gloo down alone, or during interpreter
    shutdown, can abort with "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def average_in_place(tensors: Iterable[torch.Tensor], group: Any) -> None:
    """Replace each of `tensors` (plain tensors of the same shapes on every process of `group`)
    by its mean over `group`, with one flat all-reduce per dtype: how gradients a wrapper does
    not reduce (pipeline stages, expert-parallel experts) are averaged once per step."""
    size = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)  # gloo has no AVG: sum, then divide
        flat /= size
        for tensor, averaged in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
            tensor.copy_(averaged)
