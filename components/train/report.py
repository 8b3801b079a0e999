"""What a run says about each step: the progress line and the metrics row.

Only the main process reports (`metrics` is None and the progress bar disabled elsewhere).
MFU is per device: the model's training FLOPs per token divided over the processes, against
the matmul peak `Metrics` measured for the run's compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from components.interfaces import ReportsExpertLoad
from components.train.metrics import Metrics
from components.train.progress import TrainProgress
from components.train.step import StepOutcome


def expert_load(model: torch.nn.Module) -> dict[str, Any]:
    """Per-layer expert loads of the last step and their mean max/mean imbalance ({} without MoE)."""
    loads = [m.last_load for m in model.modules() if isinstance(m, ReportsExpertLoad)]  # expert counts may differ
    if not loads:
        return {}
    imbalance = sum((load.max() / load.mean().clamp(min=1e-9)).item() for load in loads) / len(loads)
    return {"expert_load": loads, "load_imbalance": imbalance}


@dataclasses.dataclass(kw_only=True)
class StepReporter:
    """Prints each step on `bar` and logs it to `metrics` (None: not this process's job)."""

    bar: TrainProgress
    metrics: Metrics | None
    model: torch.nn.Module
    flops_per_token: float
    seq_len: int

    def report(self, *, step: int, outcome: StepOutcome, loss: float, lr: float, tokens: int, seconds: float,
               validation: dict[str, float] | None) -> None:
        """Step `step` (0-based) took `seconds` and brought the run to `tokens` tokens."""
        step_tokens = outcome.sequences * self.seq_len
        step_tps = step_tokens / seconds
        load = expert_load(self.model)
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
        row.update(validation or {})
        self.metrics.log(step + 1, row)
