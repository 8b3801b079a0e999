"""Run under torchrun (2 processes, FSDP) by tests/test_checkpoint_integrity.py: an uninterrupted
3-step run checkpointed every step into ROOT/full, then for each damage CASE a copy of it with
step 3 damaged (tests/helpers/checkpoint_damage.py), resumed; and a damaged checkpoint named
explicitly. Rank 0 and 1 each print `RESULT <json>`: {"full": losses, CASE: {chosen, losses},
"explicit": the error's message}.

    PYTHONPATH=tests python -m torch.distributed.run --nproc-per-node 2 \
        tests/helpers/workers/checkpoint_integrity.py ROOT CASE...
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import fiddle as fdl
import torch

import tessera.components.train.launch as launch_module
from tessera.cli import resolve
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.train.checkpoint import Checkpointer, ResumeError
from tessera.recipes.llama_pretrain import recipe

from helpers.checkpoint_damage import damage

ARGS = ["debug", "batch_size=4", "seq_len=32", "precision=@fp32", "progress=None", "compute.threads=1",
        "parallel=@fsdp", "scheduler.warmup_steps=1", "scheduler.total_steps=3", "steps=3", "optimizer.eps=1e-5"]


def run(folder: Path, resume: bool):
    config, _ = resolve(recipe, ARGS)
    config.metrics = None
    config.checkpoint = fdl.Config(Checkpointer, folder=str(folder), every=1, keep=5, resume=resume)
    return launch_module.launch(config)


def main() -> None:
    launch_module.leave_process_group = lambda: None  # one process group for every run below
    root, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    out = {"full": run(root / "full", False).losses}
    for case in sys.argv[2:]:
        folder = root / case.replace(" ", "_")
        if rank == 0:
            shutil.copytree(root / "full", folder)
            damage(folder / "step-00000003", case)
        torch.distributed.barrier()
        chosen = Checkpointer(folder=str(folder), resume=True).resume_path()
        out[case] = {"chosen": chosen.name, "losses": run(folder, True).losses}
    try:
        Checkpointer(folder=str(folder), resume=str(folder / "step-00000001")).resume_path()
        folder_copy = root / "explicit"
        if rank == 0:
            shutil.copytree(root / "full", folder_copy)
            damage(folder_copy / "step-00000003", "truncated")
        torch.distributed.barrier()
        Checkpointer(folder=str(folder_copy), resume=str(folder_copy / "step-00000003")).resume_path()
    except ResumeError as err:
        out["explicit"] = str(err)
    print("RESULT", json.dumps(out), flush=True)
    leave_process_group()


if __name__ == "__main__":
    main()
