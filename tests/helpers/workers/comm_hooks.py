"""Run on 2 processes by tests/test_comm_hooks.py: each DDP communication hook's
numerics on a small MLP, then end-to-end runs of the llama debug model, in the same processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/comm_hooks.py \
        RESULTS.pt STEPS WARMUP '{"name": "overrides", ...}'

Rank 0 saves {"numerics": {hook: record}, "runs": {name: {losses, bytes, param_bytes}}} to RESULTS.pt.
"""

from __future__ import annotations

import copy
import json
import sys

import fiddle as fdl
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import tessera.components.train.launch as launching
from tessera.cli import resolve
from tessera.components.parallel.hooks.fp16 import Fp16Compression
from tessera.components.parallel.hooks.one_bit import OneBitCompression
from tessera.components.parallel.hooks.powersgd import PowerSGD
from tessera.components.parallel.process_group import ensure_process_group, leave_process_group
from tessera.recipes.llama_pretrain import recipe

HOOKS = {"fp16": lambda: Fp16Compression(), "powersgd": lambda: PowerSGD(rank=1, start_iter=2),
         "one_bit": lambda: OneBitCompression(warmup_steps=2)}


def gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def numerics(name: str, steps: int = 5) -> dict:
    """Every rank's own gradients (an unwrapped copy of the model) and what DDP + hook left."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12))
    ddp = DistributedDataParallel(copy.deepcopy(ref))
    hook = HOOKS[name]()
    hook.register(ddp, None)
    record = {"local": [], "reduced": [], "bytes": [], "shapes": [tuple(p.shape) for p in ref.parameters()]}
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        x, y = torch.randn(8, 24, generator=g), torch.randn(8, 12, generator=g)
        ref.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        record["local"].append([gather(p.grad) for p in ref.parameters()])
        ddp.zero_grad()
        before = hook.bytes_sent
        nn.functional.mse_loss(ddp(x), y).backward()
        record["bytes"].append(hook.bytes_sent - before)
        record["reduced"].append([p.grad.clone() for p in ddp.module.parameters()])
    return record


def main() -> None:
    results_path, steps, warmup, runs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    ensure_process_group()
    results = {"numerics": {name: numerics(name) for name in HOOKS}, "runs": {}}
    dist.barrier()

    # The end-to-end runs share this process group: launch() leaves it after a run, and joining a
    # new one in the same processes hangs, so it is left once, after the last run.
    launching.leave_process_group = lambda: None
    args = ["debug", "batch_size=8", "seq_len=64", "precision=@fp32", "compute.threads=1", "progress=None",
            "checkpoint=None", "metrics=None", "validation.batches=0", "model.layers[*].attention.dropout=0.0",
            f"scheduler.warmup_steps={warmup}", f"steps={steps}", f"scheduler.total_steps={steps}"]
    for name, plan in runs.items():
        config, _ = resolve(recipe, [*args, *plan.split()])
        hook = None
        if config.parallel.comm_hook is not None:
            hook = fdl.build(config.parallel.comm_hook)  # the run's own instance, to read its count
            config.parallel.comm_hook = hook
        result = launching.launch(config)
        params = sum(p.numel() * p.element_size() for p in result.model.parameters())
        results["runs"][name] = {"losses": result.losses, "bytes": getattr(hook, "bytes_sent", None),
                                 "param_bytes": params}
    if dist.get_rank() == 0:
        torch.save(results, results_path)
    leave_process_group()


if __name__ == "__main__":
    main()
