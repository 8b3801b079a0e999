"""Run by tests/test_resume_auto.py as one rank of one launcher attempt: join the process group
the way a run does (RANK, WORLD_SIZE, MASTER_ADDR/PORT and torchrun's TORCHELASTIC_* variables
set by the test), all-reduce a one, print the sum and leave; with DIE=1, end there as a killed
process does, leaving the group undestroyed (its keys stay in the store).

    RANK=1 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/helpers/workers/join_attempt.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tessera.components.parallel.process_group import ensure_process_group, leave_process_group

if __name__ == "__main__":
    ensure_process_group()
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"joined: sum {total.item():g}", flush=True)
    if os.environ.get("DIE") == "1":
        os._exit(0)
    leave_process_group()
