"""`--dry-run`: the model's size and cost, and the memory and communication plan of the run's
parallel layout, computed on the meta device without any weights."""

from __future__ import annotations

import os
from typing import Any

import fiddle as fdl
from rich.console import Console
from rich.table import Table

from tessera.components.interfaces import RoutedExperts
from tessera.components.model import stats
from tessera.components.moe.experts import ROW_MULTIPLE
from tessera.components.train import activation_memory, comm_volume, pipeline_bubble, planner
from tessera.components.train.launch import build_model_on_meta


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
    report["plan"] = plan_report(config, model, console=console)
    return report


def layout_of(config: fdl.Buildable) -> planner.PlannedLayout:
    """The layout to plan: the degrees of the config's `parallel` plan (`single`: one process;
    `fsdp` and `dp_shard=-1`: WORLD_SIZE processes)."""
    parallel = config.__arguments__.get("parallel")
    if parallel is None:
        return planner.PlannedLayout()
    args = fdl.ordered_arguments(parallel, include_defaults=True) if isinstance(parallel, fdl.Buildable) \
        else vars(parallel)
    name = parallel.__fn_or_cls__.__name__ if isinstance(parallel, fdl.Buildable) else type(parallel).__name__
    world = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = {k: args[k] for k in ("dp_replicate", "dp_shard", "tp", "pp", "ep") if isinstance(args.get(k), int)}
    if name == "FullyShardedDataParallel":
        degrees["dp_shard"] = -1
    if degrees.get("dp_shard") == -1:
        fixed = degrees.get("dp_replicate", 1) * degrees.get("tp", 1) * degrees.get("pp", 1)
        degrees["dp_shard"] = max(1, world // fixed)
    extra = {k: args[k] for k in ("zero1", "reshard_after_forward", "schedule", "virtual_stages") if k in args}
    return planner.PlannedLayout(**degrees, **extra)


def _check_plan(parallel: Any, model: Any, world: int) -> None:
    """A mesh plan's faults for `model` on `world` processes (`MeshError`), as the run would
    raise them before training: tp not dividing the heads, more stages than layers, ..."""
    from tessera.components.parallel.mesh import Mesh

    plan = fdl.build(parallel) if isinstance(parallel, fdl.Buildable) else parallel
    if isinstance(plan, Mesh):
        plan.check(model, world)


def plan_report(config: fdl.Buildable, model: Any, *, console: Console, capacity_gb: float = 80.0) -> dict[str, Any]:
    """Print and return the per-rank memory, communication per step and pipeline bubble of the
    config's layout; `fits_80gb` and `dominant` say whether the peak fits and what dominates."""
    args = config.__arguments__
    layout = layout_of(config)
    _check_plan(args.get("parallel"), model, layout.world)
    seq_len = args.get("seq_len", 2048)
    batch = args.get("batch_size", 1)
    micro = getattr(args.get("step"), "micro_batch_size", None) or max(1, batch // layout.dp)
    n_micro = max(1, batch // (micro * layout.dp))
    schedule_micro = _pipeline_microbatches(args.get("parallel"))
    if layout.pp > 1 and schedule_micro:  # the schedule re-splits a step's rows into its own micro-batches
        micro, n_micro = max(1, batch // layout.dp // schedule_micro), schedule_micro
    precision = planner.precision_of(args.get("precision"))
    device = args.get("device", "cpu")
    # a GPU run's attention is fused (flash/efficient kernels save no [seq, seq] probabilities)
    fused = device != "cpu"
    # routed experts pad each expert's rows to ROW_MULTIPLE on CPU (GPU runs pad nothing)
    acts = activation_memory.measure(model, micro_batch=micro, seq_len=seq_len, ep=layout.ep,
                                     row_multiple=1 if fused else ROW_MULTIPLE)
    checkpointing = getattr(args.get("compute"), "activation_checkpointing", "none")
    mem = planner.memory(model, layout, precision, acts, n_micro=n_micro, checkpointing=checkpointing,
                         fused_attention=fused, vocab_size=model.vocab_size if hasattr(model, "vocab_size") else None,
                         tokens=micro * seq_len)
    moes = [m for m in model.layers.modules() if isinstance(m, RoutedExperts)]
    comm = comm_volume.per_step(model, layout, precision, n_micro=n_micro, tokens=micro * seq_len,
                                dim=model.embedding.weight.shape[1], moe_layers=len(moes),
                                top_k=moes[0].top_k if moes else 0)
    bubble = pipeline_bubble.bubble_fraction(layout.schedule, p=layout.pp, m=n_micro, v=layout.virtual_stages)
    fits = planner.fits(mem, capacity_gb)
    dominant = mem.dominant()
    shown = (f"dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard} tp={layout.tp} pp={layout.pp} "
             f"ep={layout.ep}{' zero1' if layout.zero1 else ''}"
             + (f" schedule={layout.schedule}" if layout.pp > 1 else ""))
    table = Table(title=f"plan: {layout.world:,} ranks ({shown}), {n_micro} micro-batch(es) of {micro} x {seq_len}")
    table.add_column("per rank (busiest pipeline rank)")
    table.add_column("value", justify="right")
    for label, value in mem.terms().items():
        table.add_row(f"memory: {label}", planner.gib(value))
    table.add_row("memory: peak", planner.gib(mem.total))
    for kind, value in comm.items():
        table.add_row(f"communication per step: {kind}", planner.gib(value))
    table.add_row("pipeline bubble", f"{bubble:.1%}")
    console.print(table)
    verdict = "fits" if fits else "does not fit"
    console.print(f"plan: peak {mem.total / 1e9:,.1f} GB per rank {verdict} a {capacity_gb:.0f} GB GPU; "
                  f"{dominant} dominate ({mem.terms()[dominant] / mem.total:.0%} of the peak)", highlight=False)
    alternatives = {}
    if not fits and dominant == "activations":
        for other in ("selective", "full"):
            if other != checkpointing:
                alt = planner.memory(model, layout, precision, acts, n_micro=n_micro, checkpointing=other,
                                     fused_attention=fused, vocab_size=getattr(model, "vocab_size", None),
                                     tokens=micro * seq_len)
                alternatives[other] = alt.total
                console.print(f"plan: with compute.activation_checkpointing={other}: peak {alt.total / 1e9:,.1f} GB "
                              f"({'fits' if planner.fits(alt, capacity_gb) else 'does not fit'})", highlight=False)
    return {"layout": layout, "memory": mem.terms(), "checkpointing_alternatives": alternatives,
            "peak_bytes": mem.total, "communication": comm,
            "bubble": bubble, "fits_80gb": fits, "dominant": dominant, "n_micro": n_micro}


def _pipeline_microbatches(parallel: Any) -> int | None:
    """The pipeline schedule's own micro-batch count (`@mesh(n_microbatches=m)`), or None."""
    if parallel is None:
        return None
    value = parallel.__arguments__.get("n_microbatches") if isinstance(parallel, fdl.Buildable) \
        else getattr(parallel, "n_microbatches", None)
    return value if isinstance(value, int) else None


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
