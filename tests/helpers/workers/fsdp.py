"""Run under torchrun by tests/test_fsdp.py: the llama recipe under `parallel=@fsdp`, checkpointing
every 2 steps into FOLDER (resumed if it holds any; asynchronously if ASYNC_SAVE=1); rank 0
prints `LOSSES <json>`.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/fsdp.py STEPS FOLDER OVERRIDES...
"""

from __future__ import annotations

import json
import os
import sys

import fiddle as fdl

from tessera.cli import resolve
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe


def main() -> None:
    steps, folder, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    config, _ = resolve(recipe, [*overrides, f"steps={steps}", "parallel=@fsdp"])
    config.checkpoint = fdl.Config(Checkpointer, folder=folder, every=2, keep=5, resume=True,
                                   async_save=os.environ.get("ASYNC_SAVE") == "1")
    result = launch(config)
    if os.environ["RANK"] == "0":
        print("LOSSES", json.dumps(result.losses))


if __name__ == "__main__":
    main()
