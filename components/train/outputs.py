"""Where a recipe's run reports: its metrics and checkpoints under one folder."""

from __future__ import annotations

import fiddle as fdl

from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.metrics import Metrics


def run_outputs(folder: str, *, every: int, keep: int = 2, downstream: str | None = None) -> dict[str, fdl.Config]:
    """`metrics` (JSONL, TensorBoard, summary, plots; validation every `every` steps, with the
    `downstream` tasks' accuracy) in `folder`, and `checkpoint` every `every` steps into
    `folder/checkpoints`, keeping `keep`. Spread into a train partial:
    `fdl.Partial(train, ..., **run_outputs(...))`; resume with the recipe's `--resume`."""
    return {"metrics": fdl.Config(Metrics, folder=folder, eval_every=every, downstream=downstream),
            "checkpoint": fdl.Config(Checkpointer, folder=f"{folder}/checkpoints", every=every, keep=keep)}
