"""What a run says about each step: the progress line and the metrics row.

Only the main process reports (`metrics` is None and the progress bar disabled elsewhere).
MFU is per device: the model's training FLOPs per token divided over the processes, against
the matmul peak `Metrics` measured for the run's compute dtype.

Under pipeline parallelism each process holds only its stages' MoE layers, so the expert
loads are gathered over the processes that hold the layers between them (`layer_group`)
before the main process logs them: the logged loads cover every MoE layer of the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from tessera.components.interfaces import ReportsExpertLoad
from tessera.components.train.metrics import Metrics, layer_order
from tessera.components.train.progress import TrainProgress
from tessera.components.train.step import StepOutcome


def expert_load(model: torch.nn.Module, *, layer_group: Any = None) -> dict[str, Any]:
    """Per-layer expert loads of the last step and their mean max/mean imbalance ({} without MoE).

    `expert_load`: one float tensor [n_experts] per MoE layer (expert counts may differ), in
    the model's layer order (`metrics.layer_order`: main layers by index, then MTP modules),
    the order `metrics.moe_layer_indices` labels them in. `layer_group`: the process group
    the model's layers are split over (pipeline stages: `ParallelPlan.gradient_norm_group()`);
    every process of it must call this (a collective), and each gets every layer's load.
    None: this process holds every layer.
    """
    named = sorted(((name, m) for name, m in model.named_modules() if isinstance(m, ReportsExpertLoad)),
                   key=lambda item: layer_order(item[0]))
    loads = {name: m.last_load for name, m in named}
    if layer_group is not None and dist.get_world_size(layer_group) > 1:
        loads = _gathered(loads, layer_group)
    if not loads:
        return {}
    layers = list(loads.values())
    imbalance = sum((load.max() / load.mean().clamp(min=1e-9)).item() for load in layers) / len(layers)
    return {"expert_load": layers, "load_imbalance": imbalance}


def _gathered(loads: dict[str, torch.Tensor], group: Any) -> dict[str, torch.Tensor]:
    """Every process's `loads` (module name -> [n_experts]) merged, in layer order. The names
    are the whole model's (a pipeline stage keeps them), so they do not collide across
    stages; a layer two processes hold (data-parallel replicas of one stage) has the same
    load on both (summed over its load group), so either copy serves."""
    parts: list[dict[str, list[float]] | None] = [None] * dist.get_world_size(group)
    # a few hundred floats per stage: objects keep the uneven per-stage counts simple
    dist.all_gather_object(parts, {name: load.tolist() for name, load in loads.items()}, group=group)
    merged = {name: values for part in parts for name, values in (part or {}).items()}
    return {name: torch.tensor(merged[name], dtype=torch.float32) for name in sorted(merged, key=layer_order)}


@dataclasses.dataclass(kw_only=True)
class StepReporter:
    """Prints each step on `bar` and logs it to `metrics` (None: not this process's job)."""

    bar: TrainProgress
    metrics: Metrics | None
    model: torch.nn.Module
    flops_per_token: float
    seq_len: int
    layer_group: Any = None
    """The process group the model's layers are split over (pipeline stages), whose expert
    loads are gathered before logging; None: this process holds every layer."""

    def report(self, *, step: int, outcome: StepOutcome, loss: float, lr: float, tokens: int, seconds: float,
               validation: dict[str, float] | None, rank_times: dict[str, list[float]] | None = None) -> None:
        """Step `step` (0-based) took `seconds` and brought the run to `tokens` tokens.
        `rank_times`: per-rank lists logged as they are (`step_time_ranks`, `wait_time_ranks`)."""
        step_tokens = outcome.sequences * self.seq_len
        step_tps = step_tokens / seconds
        load = expert_load(self.model, layer_group=self.layer_group)  # every process: a collective under pp
        note = f"load max/mean {load['load_imbalance']:.2f}" if load else ""
        mfu = self.flops_per_token * step_tps / self.metrics.peak_flops if self.metrics is not None else None
        if mfu is not None:
            note = f"MFU {mfu:.1%}  {note}"
        self.bar.update(step=step, loss=loss, lr=lr, tokens=step_tokens, grad_norm=outcome.grad_norm, note=note)
        if self.metrics is None:
            return
        row = {"loss": loss, **{k: v for k, v in outcome.terms.items() if k != "lm"}, "lr": lr,
               "grad_norm": outcome.grad_norm, "tokens": tokens, "tokens_per_second": step_tps, "mfu": mfu,
               "skipped": int(not outcome.update), **load}
        if "expert_load" in row:  # per-layer loads as lists only when they are logged
            row["expert_load"] = [layer.tolist() for layer in row["expert_load"]]
        row.update(rank_times or {})
        row.update(validation or {})
        self.metrics.log(step + 1, row)
