"""`--dry-run`: the model's size and cost, computed on the meta device without any weights."""

from __future__ import annotations

from typing import Any

import fiddle as fdl
from rich.console import Console
from rich.table import Table

from components.model.stats import count_parameters, embedding_parameters, training_flops_per_token
from components.train.launch import build_model_on_meta


def dry_run(config: fdl.Buildable, *, console: Console | None = None) -> dict[str, float]:
    """Print and return total parameters, non-embedding parameters and training FLOPs per token."""
    console = console or Console()
    model = build_model_on_meta(config.model)
    seq_len = config.__arguments__.get("seq_len", 2048)
    report: dict[str, Any] = {
        "parameters": count_parameters(model),
        "non_embedding_parameters": count_parameters(model) - embedding_parameters(model),
        "seq_len": seq_len,
        "training_flops_per_token": training_flops_per_token(model, seq_len),
    }
    table = Table(title="dry run (meta device, no weights)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters (total)", f"{report['parameters']:,}  ({_short(report['parameters'])})")
    table.add_row("parameters (non-embedding)", f"{report['non_embedding_parameters']:,}")
    table.add_row(f"training FLOPs per token (seq {seq_len})", f"{report['training_flops_per_token']:.4g}")
    console.print(table)
    return report


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
