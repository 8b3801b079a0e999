"""`--dry-run`: the model's size and cost, computed on the meta device without any weights."""

from __future__ import annotations

from typing import Any

import fiddle as fdl
from rich.console import Console
from rich.table import Table

from components.model import stats
from components.train.launch import build_model_on_meta


def dry_run(config: fdl.Buildable, *, console: Console | None = None) -> dict[str, Any]:
    """Print and return parameter counts (total, main model, activated per token), training
    FLOPs per token at the run's seq_len, and the KV-cache size per token."""
    console = console or Console()
    model = build_model_on_meta(config.model)
    seq_len = config.__arguments__.get("seq_len", 2048)
    report: dict[str, Any] = {
        "parameters": stats.count_parameters(model),
        "main_model_parameters": stats.main_model_parameters(model),
        "mtp_parameters": stats.mtp_parameters(model),
        "activated_excluding_embedding": stats.activated_parameters(model, include_embedding=False),
        "activated_including_embedding": stats.activated_parameters(model, include_embedding=True),
        "non_embedding_parameters": stats.count_parameters(model) - stats.embedding_parameters(model),
        "seq_len": seq_len,
        "training_flops_per_token": stats.training_flops_per_token(model, seq_len),
        "kv_cache_elements_per_token": stats.kv_cache_elements_per_token(model),
    }
    table = Table(title="dry run (meta device, no weights)")
    table.add_column("quantity")
    table.add_column("value", justify="right")

    def row(label: str, value: float) -> None:
        table.add_row(label, f"{value:,.0f}  ({_short(value)})")

    row("parameters (total)", report["parameters"])
    if report["mtp_parameters"]:
        row("parameters (main model, without MTP)", report["main_model_parameters"])
        row("parameters (MTP modules)", report["mtp_parameters"])
    row("activated per token (excl. input embedding; V2/V3 convention)", report["activated_excluding_embedding"])
    row("activated per token (incl. input embedding; DeepSeekMoE convention)",
        report["activated_including_embedding"])
    row("parameters (non-embedding)", report["non_embedding_parameters"])
    table.add_row(f"training FLOPs per token (seq {seq_len})", f"{report['training_flops_per_token']:.4g}")
    table.add_row("KV cache elements per token (all layers)", f"{report['kv_cache_elements_per_token']:,}")
    console.print(table)
    return report


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
