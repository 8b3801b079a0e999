"""Run on 2 processes by tests/test_diloco.py: DiLoCo and local SGD on a small MLP
(each rank's weights around every sync, and the all-reduces it issued), then end-to-end runs of
the llama debug model, in the same processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/diloco.py \
        RESULTS.pt STEPS H '{"name": "overrides", ...}'

Rank 0 saves {"diloco" | "local_sgd" | "every_step": record, "runs": {name: {...}}} to RESULTS.pt.
"""

from __future__ import annotations

import json
import sys

import fiddle as fdl
import torch
import torch.distributed as dist
from torch import nn

import tessera.components.train.launch as launching
from tessera.cli import resolve
from tessera.components.parallel.diloco import DiLoCo, local_sgd
from tessera.components.parallel.process_group import ensure_process_group, leave_process_group
from tessera.recipes.llama_pretrain import recipe

calls = {"all_reduce": 0}
real_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    calls["all_reduce"] += 1
    return real_all_reduce(*args, **kwargs)


def gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def replicas(sync, steps: int = 9) -> dict:
    """Each rank's weights before and after `sync.after_step` at every step (inner SGD on the
    rank's own data), and the all-reduces the sync issued."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sync.begin(model, dist.group.WORLD)
    record = {"start": [p.detach().clone() for p in model.parameters()], "before": [], "after": []}
    calls["all_reduce"] = 0
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(100 * step + dist.get_rank())
        nn.functional.mse_loss(model(torch.randn(8, 6, generator=g)), torch.randn(8, 3, generator=g)).backward()
        inner.step()
        inner.zero_grad()
        record["before"].append([gather(p.detach()) for p in model.parameters()])
        dist.all_reduce = counting_all_reduce  # counted only inside the sync
        sync.after_step(model, step, dist.group.WORLD)
        dist.all_reduce = real_all_reduce
        record["after"].append([gather(p.detach()) for p in model.parameters()])
    record.update(all_reduces=calls["all_reduce"], bytes=sync.bytes_sent, syncs=sync.syncs,
                  param_bytes=sum(p.numel() * 4 for p in model.parameters()))
    return record


def main() -> None:
    results_path, steps, h, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    ensure_process_group()
    results = {"diloco": replicas(DiLoCo(inner_steps=h, outer_lr=0.7, outer_momentum=0.9)),
               "local_sgd": replicas(local_sgd(inner_steps=h)),
               "every_step": replicas(local_sgd(inner_steps=1)), "runs": {}}
    dist.barrier()

    # The end-to-end runs share this process group (see tests/helpers/workers/comm_hooks.py).
    launching.leave_process_group = lambda: None
    args = ["debug", "batch_size=8", "seq_len=64", "precision=@fp32", "compute.threads=1", "progress=None",
            "checkpoint=None", "metrics=None", "validation.batches=0", "model.layers[*].attention.dropout=0.0",
            "scheduler.warmup_steps=10", f"steps={steps}", f"scheduler.total_steps={steps}"]
    for name, plan in runs.items():
        config, _ = resolve(recipe, [*args, *plan.split()])
        sync = None
        if config.parallel.periodic_sync is not None:
            sync = fdl.build(config.parallel.periodic_sync)  # the run's own instance, to read its counts
            config.parallel.periodic_sync = sync
        result = launching.launch(config)
        final = [gather(p.detach()) for p in result.model.parameters()]
        results["runs"][name] = {
            "losses": result.losses, "syncs": getattr(sync, "syncs", None), "bytes": getattr(sync, "bytes_sent", None),
            "param_bytes": sum(p.numel() * p.element_size() for p in result.model.parameters()),
            "replicas_equal": all(bool((t[0] == t[1]).all()) for t in final)}
    if dist.get_rank() == 0:
        torch.save(results, results_path)
    leave_process_group()


if __name__ == "__main__":
    main()
