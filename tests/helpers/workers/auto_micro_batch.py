"""Run by tests/test_auto_micro_batch.py under torchrun: the tiny debug run with
step.micro_batch_size=auto on data-parallel processes whose budgets differ (rank r's
step.memory_limit is argv[1 + r]); every rank prints `CHOSE <rank> <micro-batch>`.

    PYTHONPATH=tests python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/helpers/workers/auto_micro_batch.py 8GB 90MB
"""

from __future__ import annotations

import os
import sys

import fiddle as fdl

from tessera.cli import resolve
from tessera.components.train import auto_micro_batch
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe

from helpers.stdlib_bytes import StdlibBytes


def main() -> None:
    rank = int(os.environ["RANK"])
    choose = auto_micro_batch.choose

    def reported(*args, **kwargs):  # the note is printed by rank 0 alone: each rank says its own choice
        choice = choose(*args, **kwargs)
        print(f"CHOSE {rank} {choice.size}", flush=True)
        return choice

    auto_micro_batch.choose = reported
    config, _ = resolve(recipe, ["debug", "steps=2", "batch_size=16", "seq_len=64", "precision=@fp32",
                                 "compute.threads=1", "metrics=None", "checkpoint=None",
                                 "parallel=@mesh(dp_replicate=2)", "step.micro_batch_size=auto",
                                 f"step.memory_limit={sys.argv[1 + rank]}"])
    config.data = fdl.Config(StdlibBytes, max_bytes=400_000)
    config.model.vocab_size = 2048
    launch(config)


if __name__ == "__main__":
    main()
