"""Run under torchrun by tests/test_continue_hf.py: each transformers checkpoint FOLDER loaded
into the model laid out by `parallel=@fsdp`; rank r writes OUT/rank-r.json with, per folder and
parameter, whether it is a DTensor, its local and whole shapes, the values this rank read, and
whether the local piece equals the rank's chunk of the whole tensor loaded in one process
(`load_pretrained`, which tests/test_hf_load.py checks against transformers' logits).

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/hf_sharded_load.py OUT FOLDER...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tessera.components.families.hf_checkpoint import config_from_hf, load_into, load_pretrained, read_config
from tessera.components.parallel.fsdp import FullyShardedDataParallel
from tessera.components.train.launch import build_model_on_meta


def report(folder: str, rank: int, world: int) -> dict:
    plan = FullyShardedDataParallel()
    model = plan.apply(build_model_on_meta(config_from_hf(read_config(folder))), device="cpu")
    plan.materialize(model, "cpu")
    read = load_into(model, folder)
    whole = dict(load_pretrained(folder).named_parameters())
    out = {"read": read, "total": sum(t.numel() for t in whole.values()), "params": {}}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        chunk = torch.chunk(whole[name].detach(), world, dim=0)[rank]  # FSDP2's dim-0 shard of this rank
        out["params"][name] = {"dtensor": isinstance(param, DTensor), "local": list(local.shape),
                               "whole": list(param.shape), "equal": bool(torch.equal(local.detach(), chunk))}
    return out


def main() -> None:
    out, folders = sys.argv[1], sys.argv[2:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    reports = {folder: report(folder, rank, world) for folder in folders}
    # a file per rank: two ranks' long lines on one pipe can interleave
    Path(out, f"rank-{rank}.json").write_text(json.dumps(reports))


if __name__ == "__main__":
    main()
