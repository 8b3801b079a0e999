"""Run by tests/test_auto_micro_batch.py under torchrun: the tiny debug run with
step.micro_batch_size=auto on data-parallel processes whose budgets differ (rank r's
step.memory_limit is argv[2 + r]); every rank writes its choice to <argv[1]>/chosen-<rank>
(a file: two processes' printed lines can interleave).

    PYTHONPATH=tests python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/helpers/workers/auto_micro_batch.py /tmp/out 8GB 90MB
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
        (Path(sys.argv[1]) / f"chosen-{rank}").write_text(str(choice.size))
        return choice

    auto_micro_batch.choose = reported
    config, _ = resolve(recipe, ["debug", "steps=2", "batch_size=16", "seq_len=64", "precision=@fp32",
                                 "compute.threads=1", "metrics=None", "checkpoint=None",
                                 "parallel=@mesh(dp_replicate=2)", "step.micro_batch_size=auto",
                                 f"step.memory_limit={sys.argv[2 + rank]}"])
    config.data = fdl.Config(StdlibBytes, max_bytes=400_000)
    config.model.vocab_size = 2048
    launch(config)


if __name__ == "__main__":
    main()
