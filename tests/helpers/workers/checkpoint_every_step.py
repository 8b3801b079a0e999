"""Run by tests/test_checkpoint.py (which kills it mid-run, then starts it again): 12 steps of the
llama debug model with dropout, checkpointing every step into FOLDER and resuming from it; prints
FINISHED at the end.

    python tests/helpers/workers/checkpoint_every_step.py FOLDER
"""

from __future__ import annotations

import sys

import fiddle as fdl

from tessera.cli import resolve
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe


def main() -> None:
    config, _ = resolve(recipe, ["debug", "steps=12", "batch_size=8", "seq_len=64", "precision=@fp32",
                                 "compute.threads=1", "progress=None", "scheduler.total_steps=12",
                                 "scheduler.warmup_steps=2", "model.layers[*].attention.dropout=0.1"])
    config.checkpoint = fdl.Config(Checkpointer, folder=sys.argv[1], every=1, keep=20, resume=True)
    launch(config)
    print("FINISHED")


if __name__ == "__main__":
    main()
