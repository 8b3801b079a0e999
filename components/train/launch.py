"""Turns a validated run config into a running job: the model is built on the meta device."""

from __future__ import annotations

import copy
import functools
from typing import Any

import fiddle as fdl
import torch

from tessera.components.interfaces import HasTokenizer
from tessera.components.model.meta import on_meta
from tessera.components.parallel.process_group import leave_process_group
from tessera.registry import serialize


def build_model_on_meta(model_config: fdl.Buildable) -> torch.nn.Module:
    """Build the model config with every parameter on the meta device (no memory, no init)."""
    with on_meta():
        return fdl.build(model_config)


def _from_hf(config: fdl.Partial) -> str | None:
    """The transformers checkpoint the run started from (`init.from_hf`), if any."""
    init = config.__arguments__.get("init")
    return getattr(init, "from_hf", None)


def launch(config: fdl.Partial, *, export_hf: str | None = None) -> Any:
    """Build `config` (a `fdl.Partial` of a train function with a `model` argument) and call it.

    The model is built on the meta device first so that the parallel plan can shard it
    before weights are materialised; everything else is built normally. `export_hf`: a
    folder to write the trained model into as a transformers checkpoint (see
    `tessera.components.train.export`; check it can with `export_faults` before calling).
    """
    run = copy.copy(config)
    if "model" in config.__arguments__:
        run.model = build_model_on_meta(config.model)
    job = fdl.build(run)
    checkpoint = job.keywords.get("checkpoint") if isinstance(job, functools.partial) else None
    data = job.keywords.get("data") if isinstance(job, functools.partial) else None
    if checkpoint is not None:  # every checkpoint carries the config that produced it, and its tokenizer
        checkpoint.run_config = serialize.dumps(config)
        checkpoint.tokenizer = data if isinstance(data, HasTokenizer) else None
    result = job()
    if export_hf is not None:
        from tessera.components.train.export import export_hf as export

        source = _from_hf(config)
        seq_len = config.__arguments__.get("seq_len", 4096)
        encoding = data.encoding() if isinstance(data, HasTokenizer) and source is None else None
        architecture = export(result.model, export_hf, model_config=config.model, max_position_embeddings=seq_len,
                              source=source, encoding=encoding)
        if architecture is not None:
            print(f"exported the model as {architecture} to {export_hf}", flush=True)
    leave_process_group()  # a data-parallel run's processes leave together (no-op in one process)
    return result
