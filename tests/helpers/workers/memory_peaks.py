"""Run by tests/test_planner.py, in one process or several: for each case, the peak of live
tensor bytes (tests/helpers/live_bytes.py) from building the debug model under the case's parallel
plan through two optimizer steps, the busiest process's; prints `PEAKS <json>` (rank 0).

    PYTHONPATH=tests python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/memory_peaks.py \
        '{"name": [recipe, plan kind, plan arguments, [global batch, seq_len, micro-batches]], ...}'
"""

from __future__ import annotations

import importlib
import json
import sys

import fiddle as fdl
import torch
import torch.distributed as dist

from tessera.components.optim.param_groups import decay_groups
from tessera.registry import PARALLEL_PLAN

from helpers.live_bytes import LiveTensorBytes


def measure(recipe_name, parallel, batch, seq, n_micro, optimizer=None) -> int:
    """`optimizer`: a factory called with the model's parameter groups (`decay_groups`, as the
    trainer does); None: torch's AdamW over the parameters."""
    torch.manual_seed(0)
    cfg = importlib.import_module(f"tessera.recipes.{recipe_name}").recipe.config("debug")
    tracker = LiveTensorBytes()
    with tracker:
        with torch.device("meta"):
            model = fdl.build(cfg.model)
        plan = fdl.build(parallel)
        model = plan.apply(model, device="cpu")
        plan.materialize(model, "cpu")
        plan.ready(model)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer is None else \
            optimizer(decay_groups(model))
        opt = plan.wrap_optimizer(inner)
        rank, dp = plan.data_parallel
        rows = torch.Generator().manual_seed(rank)
        for _ in range(2):
            tokens = torch.randint(0, cfg.model.vocab_size, (batch // dp, seq + 1), generator=rows)
            micro = [dict(tokens=t[:, :-1], targets=t[:, 1:]) for t in torch.chunk(tokens, n_micro)]
            plan.forward_backward(model, micro, n_micro=n_micro,
                                  losses=lambda b: model.losses(b["tokens"], b["targets"]),
                                  backward=lambda loss: loss.backward())
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = torch.tensor(float(tracker.peak))
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the busiest process, as the planner reports
    return int(peak.item())


def main() -> None:
    cases = json.loads(sys.argv[1])
    peaks = {name: measure(r, PARALLEL_PLAN.config(kind, **kw), *shape) for name, (r, kind, kw, shape) in cases.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("PEAKS" + json.dumps(peaks))


if __name__ == "__main__":
    main()
