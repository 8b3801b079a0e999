"""Run under `torchrun --max-restarts` (2 processes) by tests/test_hook_resume.py: for each
data-parallel plan given, the llama debug model trained 6 steps straight, and the same run
(`--resume auto`, a checkpoint every 3 steps) with rank 1 SIGKILLed right after its step-3
checkpoint, as a node dying mid-run would. torchrun then restarts both processes; the restarted
attempt finds each plan's finished work on disk, resumes the killed run from its step-3
checkpoint and goes on to the next plan, whose cut run dies in its turn.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 3 \
        tests/helpers/workers/hook_resume.py FOLDER '{"name": "overrides", ...}'

Writes FOLDER/<name>/{full,cut}/step-00000006 (the checkpoints the test compares) and, on the
launcher attempt that killed each cut run, FOLDER/<name>/killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

import tessera.components.train.launch as launching
from tessera.cli import resolve
from tessera.components.parallel.process_group import ensure_process_group, leave_process_group
from tessera.components.train.checkpoint import AUTO, Checkpointer
from tessera.recipes.llama_pretrain import recipe

STEPS, CUT = 6, 3
ARGS = ["debug", "batch_size=4", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "metrics=None", "validation.batches=0", "model.layers[*].attention.dropout=0.0",
        "scheduler.warmup_steps=2", f"scheduler.total_steps={STEPS}", f"steps={STEPS}", f"checkpoint.every={CUT}"]
SAVE = Checkpointer.save


def run(plan: str, folder: Path) -> None:
    config, _ = resolve(recipe, [*ARGS, *plan.split(), f"checkpoint.folder={folder}"])
    config.checkpoint.resume = AUTO  # a finished run is found whole; a killed one resumes
    launching.launch(config)


def dies_after_checkpoint(marker: Path) -> None:
    """On rank 1, the next step-`CUT` checkpoint written is the last thing this process does."""
    def save_then_die(self: Checkpointer, at: int, **parts: object) -> object:
        path = SAVE(self, at, **parts)
        if at == CUT and dist.get_rank() == 1:
            marker.write_text(f"attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT')}")
            print(f"hook_resume: rank 1 dies after checkpoint {at} of {marker.parent.name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Checkpointer.save = save_then_die  # type: ignore[method-assign]


def main() -> None:
    folder, plans = Path(sys.argv[1]), json.loads(sys.argv[2])
    ensure_process_group()
    launching.leave_process_group = lambda: None  # one process group for every run of this attempt
    for name, plan in plans.items():
        if not (folder / name / "full" / f"step-{STEPS:08d}").exists():
            run(plan, folder / name / "full")
        dist.barrier()  # both ranks see the same files before deciding whether the cut run dies
        killed = folder / name / "killed"
        Checkpointer.save = SAVE
        if not killed.exists():
            dies_after_checkpoint(killed)
        run(plan, folder / name / "cut")
        dist.barrier()
    leave_process_group()


if __name__ == "__main__":
    main()
