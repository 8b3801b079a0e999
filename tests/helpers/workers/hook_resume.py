"""Run under torchrun (2 processes) by tests/test_hook_resume.py: for each data-parallel plan
given, the llama debug model trained 6 steps straight, and the same run stopped after step 3
and resumed from its step-3 checkpoint, all in the same processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/hook_resume.py \
        FOLDER '{"name": "overrides", ...}'

Writes FOLDER/<name>/{full,cut}/step-00000006 (the checkpoints the test compares); rank 0
saves {name: {"full": losses, "resumed": losses}} to FOLDER/losses.pt.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import tessera.components.train.launch as launching
from tessera.cli import resolve
from tessera.components.parallel.process_group import ensure_process_group, leave_process_group
from tessera.recipes.llama_pretrain import recipe

STEPS, STOP = 6, 3
ARGS = ["debug", "batch_size=4", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "metrics=None", "validation.batches=0", "model.layers[*].attention.dropout=0.0",
        "scheduler.warmup_steps=2", f"scheduler.total_steps={STEPS}", f"checkpoint.every={STOP}"]


def run(plan: str, folder: str, steps: int, resume: bool) -> list[float]:
    config, _ = resolve(recipe, [*ARGS, *plan.split(), f"steps={steps}", f"checkpoint.folder={folder}"])
    config.checkpoint.resume = resume
    return list(launching.launch(config).losses)


def main() -> None:
    folder, plans = sys.argv[1], json.loads(sys.argv[2])
    ensure_process_group()
    launching.leave_process_group = lambda: None  # one process group for every run here
    results = {}
    for name, plan in plans.items():
        full = run(plan, f"{folder}/{name}/full", STEPS, False)
        run(plan, f"{folder}/{name}/cut", STOP, False)
        resumed = run(plan, f"{folder}/{name}/cut", STEPS, True)
        results[name] = {"full": full, "resumed": resumed}
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, f"{folder}/losses.pt")
    leave_process_group()


if __name__ == "__main__":
    main()
