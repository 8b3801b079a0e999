"""Run on several processes by tests/test_fsdp.py: runs of the llama recipe under `parallel=@fsdp`, one
after another in the same processes, each checkpointing every 2 steps into its folder (resumed
if it holds any; asynchronously if the job says so); rank 0 prints `LOSSES <label> <json>`.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/fsdp.py \
        '[{"label": ..., "steps": N, "folder": ..., "overrides": [...], "async_save": false}, ...]'
"""

from __future__ import annotations

import json
import os
import sys

import fiddle as fdl

import tessera.components.train.launch as launching
from tessera.cli import resolve
from tessera.components.parallel.process_group import ensure_process_group, leave_process_group
from tessera.components.train.checkpoint import Checkpointer
from tessera.recipes.llama_pretrain import recipe


def run(job: dict) -> list[float]:
    config, _ = resolve(recipe, [*job["overrides"], f"steps={job['steps']}", "parallel=@fsdp"])
    config.checkpoint = fdl.Config(Checkpointer, folder=job["folder"], every=2, keep=5, resume=True,
                                   async_save=job["async_save"])
    return launching.launch(config).losses


def main() -> None:
    jobs = json.loads(sys.argv[1])
    ensure_process_group()
    # The runs share this process group: launch() leaves it after a run, and joining a new one in
    # the same processes hangs, so it is left once, after the last run.
    launching.leave_process_group = lambda: None
    for job in jobs:
        losses = run(job)
        if os.environ["RANK"] == "0":
            print("LOSSES", job["label"], json.dumps(losses), flush=True)
    leave_process_group()


if __name__ == "__main__":
    main()
