"""Joining the run's process group (torchrun sets the environment; a lone process makes its own)."""

from __future__ import annotations

import atexit
import gc
import os
import socket
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import distributed_c10d

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
        _join("cpu:gloo,cuda:nccl")
    else:
        _join("gloo")
    atexit.register(_destroy)  # an undestroyed gloo group can abort the interpreter at exit


RENDEZVOUS_TIMEOUT = "TESSERA_RENDEZVOUS_TIMEOUT"
"""Environment variable: seconds a process waits to reach the rendezvous (MASTER_ADDR:MASTER_PORT)
and its peers before it gives up with a `RendezvousError` (default 300; torch's own default is
the 30-minute collective timeout, which looked like a hang)."""


class RendezvousError(RuntimeError):
    """This process could not join the run's process group; the message names the address, the
    rank and what to check."""


def _join(backend: str) -> None:
    """`init_process_group(backend)` over a store this function makes, so that the wait for the
    rendezvous has its own limit and a restarted attempt never reads the last attempt's keys;
    any failure to connect is a `RendezvousError`."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    timeout = rendezvous_timeout()
    try:
        store = _store(rank=rank, size=size, timeout=timeout)
        # the group's timeout bounds the peers' connection too, so joining uses the rendezvous limit ...
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    except (KeyError, ValueError, RuntimeError) as err:  # DistNetworkError / DistStoreError are RuntimeErrors
        raise RendezvousError(_unreachable(address, rank=rank, size=size, timeout=timeout, error=err)) from None
    # ... and the collectives after it torch's usual limit (a long checkpoint write keeps others waiting)
    distributed_c10d._set_pg_timeout(distributed_c10d.default_pg_timeout)


def rendezvous_timeout() -> timedelta:
    """The rendezvous limit from TESSERA_RENDEZVOUS_TIMEOUT (seconds), 300 s when unset."""
    text = os.environ.get(RENDEZVOUS_TIMEOUT, "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RendezvousError(f"{RENDEZVOUS_TIMEOUT}={text!r} is not a positive number of seconds; "
                              f"set e.g. {RENDEZVOUS_TIMEOUT}=300")
    return timedelta(seconds=seconds)


def _store(*, rank: int, size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT: a client of torchrun's own store when it
    shares it with its workers, else hosted by rank 0 (plain env:// or srun). torchrun keeps that
    shared store across restarts, so the keys of the attempt that died (rank 0's old gloo address)
    would be read by the new one's faster ranks, which then fail to connect: on one node each
    attempt gets its own key prefix. (Across nodes the restart count can differ per node, so
    there the launcher must give each round a fresh store: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.)"""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, port, world_size=size, is_master=rank == 0 and not shared, timeout=timeout,
                          multi_tenant=not shared)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if shared and attempt is not None and os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        return dist.PrefixStore(f"tessera/attempt-{attempt}", store)
    return store


def _unreachable(address: str, *, rank: int, size: int, timeout: timedelta, error: BaseException) -> str:
    """The one message for a rank that cannot join: where it looked, what it waited for, what to check."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"rank {rank} of {size} could not join the process group at {address} within "
            f"{timeout.total_seconds():g} s ({type(error).__name__}: {first}). Check that rank 0 (the first node) "
            f"is running and reachable at MASTER_ADDR:MASTER_PORT from this host (the address, the port, a firewall), "
            f"that every node was started with the same address, port and world size, and, on hosts with several "
            f"network interfaces, GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME; wait longer with "
            f"{RENDEZVOUS_TIMEOUT}=SECONDS")


def leave_process_group() -> None:
    """End of a successful run: wait for every rank, then tear every group down while the
    interpreter is still whole (see `_free_dropped_groups`; a rank tearing gloo down alone,
    or during interpreter shutdown, can abort with "terminate called without an active
    exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _free_dropped_groups()


def _destroy() -> None:
    """At interpreter exit (atexit runs while the interpreter is still whole): the groups a run
    left behind are destroyed now, not during finalization."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _free_dropped_groups()


def _free_dropped_groups() -> None:
    """Destroy now the process groups nothing reachable holds any more.

    `destroy_process_group` only forgets the groups; a group object lives on while anything
    holds it, and a run's device mesh and pipeline stages hold theirs in reference cycles, which
    only the cycle collector frees, at the latest during interpreter finalization. A gloo
    group's destructor finishes its queued work and joins its worker threads; a worker that
    then drops the last reference to a tensor Python had let go must take the GIL, and once
    finalization has begun, taking it ends the thread (pthread_exit), whose unwinding through a
    noexcept destructor aborts the process: "terminate called without an active exception"
    (SIGABRT, no Python trace; tests/test_pipeline_teardown.py). Collected here, the
    destructors run while the interpreter is whole (torch releases the GIL in them), so every
    worker finishes first. A group still reachable at exit (a module-level global) is not
    freed here: drop it before the interpreter exits."""
    gc.collect()


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
