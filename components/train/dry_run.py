"""`--dry-run`: the model's size and cost, and what the run's parallel layout costs each rank in
memory and communication, computed on the meta device without any weights.

Everything about the run is asked of the built objects: the parallel plan lays the model out
(`ParallelPlan.layout`: degrees, schedule, stage placement), the precision policy says its
bytes per element (`PrecisionPolicy.element_bytes`). One that cannot answer raises
`DryRunError` naming itself and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import fiddle as fdl
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tessera.components.interfaces import ElementBytes, ParallelPlan, PrecisionPolicy, RoutedExperts
from tessera.components.model import stats
from tessera.components.moe.experts import ROW_MULTIPLE
from tessera.components.optim.state_size import state_tensors
from tessera.components.parallel.layout import Layout
from tessera.components.parallel.single import SingleProcess
from tessera.components.precision.auto import Auto
from tessera.components.train import activation_memory, comm_volume, memory_model, pipeline_bubble
from tessera.components.train.launch import build_model_on_meta

GIB = 2**30


def dry_run(config: fdl.Buildable, *, console: Console | None = None) -> dict[str, Any]:
    """Print and return parameter counts (total, main model, activated per token), training
    FLOPs per token at the run's seq_len, the KV-cache size per token, and under "per_rank"
    what the layout costs each rank (`per_rank_report`)."""
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
    report["per_rank"] = per_rank_report(config, model, console=console)
    return report


def layout_of(config: fdl.Buildable, model: nn.Module | None = None) -> Layout:
    """The layout the config's parallel plan gives its model (built on the meta device when not
    given), as the run would check it: `ParallelPlan.layout` for WORLD_SIZE processes (1
    when unset; a plan with fixed degrees lays out as many as they multiply to). No plan: one
    process, as the trainer defaults to."""
    parallel = config.__arguments__.get("parallel")
    plan: ParallelPlan = SingleProcess() if parallel is None else \
        fdl.build(parallel) if isinstance(parallel, fdl.Buildable) else parallel
    model = build_model_on_meta(config.model) if model is None else model
    return plan.layout(model, world_size=int(os.environ.get("WORLD_SIZE", "1")))


def element_bytes_of(config: fdl.Buildable) -> ElementBytes:
    """The config's precision policy's bytes per element on the run's device type (no policy:
    `auto`, as the trainer defaults to)."""
    args = config.__arguments__
    precision = args.get("precision")
    policy: PrecisionPolicy = Auto() if precision is None else \
        fdl.build(precision) if isinstance(precision, fdl.Buildable) else precision
    return policy.element_bytes(torch.device(args.get("device", "cpu")).type)


def optimizer_states_of(config: fdl.Buildable, model: nn.Module) -> dict[int, float] | None:
    """`StepShape.optimizer_states` of the config's optimizer over `model` (None: no optimizer
    given, counted as AdamW)."""
    optimizer = config.__arguments__.get("optimizer")
    if optimizer is None:
        return None
    return state_tensors(fdl.build(optimizer) if isinstance(optimizer, fdl.Buildable) else optimizer, model)


def per_rank_report(config: fdl.Buildable, model: nn.Module, *, console: Console,
                    capacity_gb: float = 80.0) -> dict[str, Any]:
    """Print and return the memory on the busiest rank, communication per step and pipeline
    bubble of the config's layout; `fits_80gb` and `dominant` say whether the peak fits and
    what dominates; `checkpointing_alternatives` the peaks with more activation
    checkpointing when activations keep it from fitting."""
    args = config.__arguments__
    layout = layout_of(config, model)
    element = element_bytes_of(config)
    seq_len = args.get("seq_len", 2048)
    micro, n_micro = _micro_batches(config, layout)
    # a GPU run's attention is fused (flash/efficient kernels save no [seq, seq] probabilities)
    fused = args.get("device", "cpu") != "cpu"
    # routed experts pad each expert's rows to at most ROW_MULTIPLE on CPU (GPU runs pad nothing)
    acts = activation_memory.measure(model, micro_batch=micro, seq_len=seq_len, ep=layout.ep,
                                     row_multiple=1 if fused else ROW_MULTIPLE)
    checkpointing = getattr(args.get("compute"), "activation_checkpointing", "none")
    step = memory_model.StepShape(n_micro=n_micro, tokens=micro * seq_len, checkpointing=checkpointing,
                                  fused_attention=fused, vocab_size=getattr(model, "vocab_size", None),
                                  optimizer_states=optimizer_states_of(config, model))
    mem = memory_model.peak_memory(model, layout, element, acts, step=step)
    moes = [m for m in model.layers.modules() if isinstance(m, RoutedExperts)]
    comm = comm_volume.per_step(model, layout, element, n_micro=n_micro, tokens=micro * seq_len,
                                dim=model.embedding.weight.shape[1], moe_layers=len(moes),
                                top_k=moes[0].top_k if moes else 0)
    bubble = pipeline_bubble.bubble_fraction(layout.schedule, p=layout.pp, m=n_micro, v=layout.virtual_stages)
    _print_table(console, layout, mem, comm, bubble, n_micro=n_micro, micro=micro, seq_len=seq_len)
    fits, dominant = mem.fits(capacity_gb), mem.dominant()
    console.print(f"plan: peak {mem.total / 1e9:,.1f} GB per rank {'fits' if fits else 'does not fit'} a "
                  f"{capacity_gb:.0f} GB GPU; {dominant} dominate ({mem.terms()[dominant] / mem.total:.0%} of the "
                  f"peak)", highlight=False)
    alternatives = {}
    if not fits and dominant == "activations":
        for other in ("selective", "full"):
            if other != checkpointing:
                alt = memory_model.peak_memory(model, layout, element, acts,
                                               step=dataclasses.replace(step, checkpointing=other))
                alternatives[other] = alt.total
                console.print(f"plan: with compute.activation_checkpointing={other}: peak {alt.total / 1e9:,.1f} GB "
                              f"({'fits' if alt.fits(capacity_gb) else 'does not fit'})", highlight=False)
    return {"layout": layout, "memory": mem.terms(), "checkpointing_alternatives": alternatives,
            "peak_bytes": mem.total, "communication": comm,
            "bubble": bubble, "fits_80gb": fits, "dominant": dominant, "n_micro": n_micro}


def _micro_batches(config: fdl.Buildable, layout: Layout) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per step) on each data-parallel rank: the
    step options' micro-batch size (default, and for "auto": the rank's whole share), or the pipeline
    schedule's own count, which re-splits a step's rows (`n_microbatches`)."""
    args = config.__arguments__
    batch = args.get("batch_size", 1)
    # the option groups: configs (or built options) when set, their defaults when absent
    micro = getattr(args.get("step"), "micro_batch_size", None)
    if not isinstance(micro, int):  # None, or "auto" (chosen at run time against the device's memory): the
        micro = max(1, batch // layout.dp)  # whole share, the largest candidate auto would try
    n_micro = max(1, batch // (micro * layout.dp))
    if layout.pp > 1 and layout.n_microbatches:
        return max(1, batch // layout.dp // layout.n_microbatches), layout.n_microbatches
    return micro, n_micro


def _print_table(console: Console, layout: Layout, mem: memory_model.RankMemory, comm: dict[str, float],
                 bubble: float, *, n_micro: int, micro: int, seq_len: int) -> None:
    shown = (f"dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard} tp={layout.tp} pp={layout.pp} "
             f"ep={layout.ep}{' zero1' if layout.zero1 else ''}"
             + (f" schedule={layout.schedule}" if layout.pp > 1 else ""))
    table = Table(title=f"plan: {layout.world:,} ranks ({shown}), {n_micro} micro-batch(es) of {micro} x {seq_len}")
    table.add_column("per rank (busiest pipeline rank)")
    table.add_column("value", justify="right")
    for label, value in mem.terms().items():
        table.add_row(f"memory: {label}", gib(value))
    table.add_row("memory: peak", gib(mem.total))
    for kind, value in comm.items():
        table.add_row(f"communication per step: {kind}", gib(value))
    table.add_row("pipeline bubble", f"{bubble:.1%}")
    console.print(table)


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
