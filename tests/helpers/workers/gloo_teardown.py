"""A run's end with gloo work still in flight, then `leave_process_group` and a normal exit.

Each process queues `N` all-reduces (argv[1]) on a process group of its own making and drops
their handles and tensors at once, so that gloo's worker threads hold the only references to
them; the group itself hangs in a reference cycle, as a run's device mesh and pipeline stages
do (garbage that only the cycle collector frees). Then it leaves as a finished run does
(`leave_process_group`) and the interpreter exits. argv[2] says when the cycle becomes
garbage: "before" leaving, or "after" (as in `launch`, which leaves while the run's objects
are still alive; they are dropped when it returns).

Unless teardown drains that work while the interpreter is whole, a worker thread releases a
tensor during interpreter finalization: taking the GIL then ends the thread (pthread_exit),
whose unwinding through a noexcept destructor aborts the process with "terminate called
without an active exception" (SIGABRT): the rare abort of issue 21.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from tessera.components.parallel.process_group import ensure_process_group, leave_process_group


def queue_and_drop(n: int) -> dict[str, object]:
    """Queue `n` all-reduces on a new group and drop every reference to them and to the group
    but one cycle's (a dict that holds itself), which is returned."""
    group = dist.new_group(list(range(dist.get_world_size())))
    for _ in range(n):
        dist.all_reduce(torch.ones(1 << 16), group=group, async_op=True)  # handle and tensor dropped
    cycle: dict[str, object] = {"group": group}
    cycle["self"] = cycle
    return cycle


def main() -> None:
    ensure_process_group()
    run = queue_and_drop(int(sys.argv[1]))
    if sys.argv[2] == "before":
        del run
    leave_process_group()
    print(f"rank {os.environ['RANK']} left", flush=True)


if __name__ == "__main__":
    main()
