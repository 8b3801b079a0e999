"""Run on several processes by tests/test_continue_hf.py: for each PLAN=FOLDER, the transformers
checkpoint FOLDER loaded into the model laid out by PLAN (`fsdp`; `tp` or `pp`: tensor or
pipeline parallel over all processes); rank r writes OUT/rank-r.json with, per PLAN=FOLDER and
parameter, whether it is a DTensor, its local and whole shapes, the values this rank read, and
whether the local piece equals what torch's own `distribute_tensor` gives this rank of the
whole tensor loaded in one process (`load_pretrained`, which tests/test_hf_load.py checks
against transformers' logits).

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/hf_sharded_load.py OUT PLAN=FOLDER...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from tessera.components.families.hf_checkpoint import config_from_hf, load_into, load_pretrained, read_config
from tessera.components.parallel.fsdp import FullyShardedDataParallel
from tessera.components.parallel.mesh import Mesh
from tessera.components.train.launch import build_model_on_meta


def report(plan_name: str, folder: str, world: int) -> dict:
    plan = FullyShardedDataParallel() if plan_name == "fsdp" else Mesh(**{plan_name: world})
    model = plan.apply(build_model_on_meta(config_from_hf(read_config(folder))), device="cpu")
    plan.materialize(model, "cpu")
    read = load_into(model, folder)
    whole = dict(load_pretrained(folder).named_parameters())
    out = {"read": read, "total": sum(t.numel() for t in whole.values()), "params": {}}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        expected = whole[name].detach()
        if isinstance(param, DTensor):
            expected = distribute_tensor(expected, param.device_mesh, param.placements).to_local()
        out["params"][name] = {"dtensor": isinstance(param, DTensor), "local": list(local.shape),
                               "whole": list(param.shape), "equal": bool(torch.equal(local.detach(), expected)),
                               "placements": [str(p) for p in param.placements] if isinstance(param, DTensor) else []}
    return out


def main() -> None:
    out, jobs = sys.argv[1], sys.argv[2:]
    world = int(os.environ["WORLD_SIZE"])
    reports = {job: report(*job.split("=", 1), world) for job in jobs}  # one process group, a mesh per plan
    rank = int(os.environ["RANK"])
    # a file per rank: two ranks' long lines on one pipe can interleave
    Path(out, f"rank-{rank}.json").write_text(json.dumps(reports))


if __name__ == "__main__":
    main()
