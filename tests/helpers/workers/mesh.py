"""Run on several processes by tests/test_mesh.py: recipe jobs under `mesh` plans, one after another in
the same processes, each reporting its losses, its whole weights and a few counts.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/mesh.py JOBS.json

JOBS.json is a list of {label, recipe, args, folder, weights}: `args` are recipe overrides (the plan
included); `folder` is where checkpoints are written (every 2 steps, resumed if there are any) or
null; each rank writes its whole tensors (a pipeline stage holds only its own) to
`<weights>.<rank>`. Rank 0 writes `<weights>.result.json`: {"losses": [...], "stats": {...}}.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import fiddle as fdl
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tessera.cli import resolve
from tessera.components.interfaces import CommHook, PeriodicSync
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.registry import COMM_HOOK, PERIODIC_SYNC

RECIPES = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}


@COMM_HOOK.register("test_fp16")
class TorchFp16(CommHook):
    """torch's fp16 compression hook, counting the bytes it all-reduces."""

    def register(self, ddp, process_group):
        def hook(group, bucket):
            self.bytes_sent += bucket.buffer().numel() * 2
            return default_hooks.fp16_compress_hook(group, bucket)

        ddp.register_comm_hook(process_group, hook)


@PERIODIC_SYNC.register("test_mean")
class MeanEveryStep(PeriodicSync):
    """Averages the replicas' weights after every step."""

    def __init__(self):
        self.seen = []

    def after_step(self, model, step, process_group):
        size = dist.get_world_size(process_group)
        with torch.no_grad():
            for param in model.parameters():
                dist.all_reduce(param, group=process_group)
                param /= size
        self.seen.append([step, size])


def run(job: dict) -> None:
    config, _ = resolve(RECIPES[job["recipe"]], job["args"])
    config.metrics = None
    config.checkpoint = None if job["folder"] is None else fdl.Config(
        Checkpointer, folder=job["folder"], every=2, keep=5, resume=True)
    run_config = copy.copy(config)
    run_config.model = build_model_on_meta(config.model)  # as `launch` does, without leaving the process group
    train = fdl.build(run_config)
    result = train()
    plan = train.keywords["parallel"]
    stats = {"params": sum(p.numel() for p in result.model.parameters()),
             "bytes": getattr(plan.comm_hook, "bytes_sent", None), "seen": getattr(plan.periodic_sync, "seen", None)}
    # every process's whole tensors (a pipeline stage holds only its own): the test merges them
    full = get_model_state_dict(result.model, options=StateDictOptions(full_state_dict=True))
    save_file({k: v.clone() for k, v in full.items()}, job["weights"] + "." + os.environ["RANK"])
    dist.barrier()
    if os.environ["RANK"] == "0":  # a file, not stdout: under torchrun the processes share one pipe, and
        # another's output without a trailing newline once ran into this line and hid it from the test
        Path(job["weights"] + ".result.json").write_text(json.dumps({"losses": result.losses, "stats": stats}))


def main() -> None:
    with open(sys.argv[1]) as jobs:
        for job in json.load(jobs):
            run(job)
    leave_process_group()


if __name__ == "__main__":
    main()
