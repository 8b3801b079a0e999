"""Tensor + sequence parallelism of a `DecoderLM` over a 1-D "tp" device mesh.

Each block type declares how its own weights split (`tensor_parallel_plan` next to its code:
GQA, MLA, the gated MLPs and the MLP); this module joins those plans into the model's:

    embedding        vocab-parallel (rows of the table sharded; each rank looks up its
                     vocabulary slice, the partial embeddings are reduce-scattered along T)
    each block       norms sequence-parallel (each rank normalises T/tp positions);
                     attention / feed-forward: input all-gathered along T, the block's own
                     plan inside, output reduce-scattered back along T
    MoE              routing and routed experts replicated (every rank routes all tokens
                     and runs every expert), shared experts split like a gated MLP (the
                     MoE's own plan: any `TensorParallel` block may take its input itself)
    final norm       sequence-parallel
    head             column-wise over the vocabulary; the loss reads vocab-sharded logits
                     (torch's `loss_parallel`), never the full [B, T, V]
    MTP modules      without sequence parallelism (their inputs are T-k long): norms and the
                     projection replicated, the block's attention and MLP split as above

Activations between modules are DTensors on the tp mesh: the residual stream is `Shard(1)`
(sequence-parallel) or `Replicate()`. Every parameter becomes a DTensor on the tp mesh, so
FSDP2 can shard the result over the data-parallel dims (`fully_shard` after this, FSDP x TP).
Megatron-LM (arXiv:1909.08053) for the tensor split, arXiv:2205.05198 §4.2.2 for the sequence split.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from tessera.components.interfaces import AbsoluteEncoding, TensorParallel, position_kind
from tessera.components.parallel.tp_styles import (
    SEQUENCE,
    ColwiseParallel,
    ParallelStyle,
    Placement,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    replicated,
)

HEAD_COUNTS = ("n_heads", "n_kv_heads")
"""Attention attributes that count heads: under tensor parallelism they become per-rank counts
(the attentions' forwards reshape projections with them)."""


class TensorParallelError(ValueError):
    """A model that tensor parallelism cannot split at the given degree."""


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
                          loss_parallel: bool = True) -> None:
    """Split `model` (a `DecoderLM`, on the meta device or materialised) over the 1-D `tp_mesh`
    in place. Call before FSDP's `fully_shard` and before materialising the weights.

    sequence_parallel: norms, dropout and residuals of the main layers work on T/tp positions
        per rank (activations `Shard(1)`), with all-gather / reduce-scatter around attention
        and MLPs instead of all-reduces; off, the residual stream is replicated.
    loss_parallel: the head's logits stay sharded over the vocabulary (a DTensor) and
        `cross_entropy` computes the loss from the shards; off, they are gathered to plain
        [B, T, V] tensors.

    Raises `TensorParallelError` naming every constraint the model breaks
    (`tensor_parallel_faults`). Afterwards each attention's `n_heads` / `n_kv_heads` hold the
    per-rank counts, and every parameter is a DTensor on `tp_mesh`.
    """
    tp = tp_mesh.size()
    faults = tensor_parallel_faults(model, tp)
    if faults:
        listed = "\n  - ".join(faults)
        raise TensorParallelError(f"tensor parallelism (tp={tp}) cannot split this model:\n  - {listed}")
    stream = SEQUENCE if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        # Replicated, the looked-up rows leave as plain tensors re-wrapped by their readers (the
        # dropout, the MTP modules): DTensor cannot turn a partial gradient back into the
        # embedding's masked-partial output, so the readers' wrapping sums the gradient first.
        "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                     use_local_output=not sequence_parallel),
        "norm": _norm(sequence_parallel),
        "head": _head(stream, loss_parallel),
    }
    if not sequence_parallel:
        plan["embedding_dropout"] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(stream,),
                                                       use_local_output=False)
    for i, layer in enumerate(model.layers):
        plan.update(_prefixed(f"layers.{i}", block_plan(layer, sequence_parallel=sequence_parallel)))
    for i, module in enumerate(model.mtp):
        plan.update(_prefixed(f"mtp.{i}", mtp_plan(module, stream=stream)))
    tied = model.tied
    parallelize_module(model, tp_mesh, plan)
    if tied:  # each style distributed its own copy of the shared table: share the head's (both Shard(0))
        model.embedding.weight = model.head.weight
    for block in model.blocks():
        for attr in HEAD_COUNTS:
            if hasattr(block.attention, attr):
                setattr(block.attention, attr, getattr(block.attention, attr) // tp)
    plain = [name for name, param in model.named_parameters() if not isinstance(param, DTensor)]
    if plain:
        raise TensorParallelError(f"tensor parallelism left parameters outside the tp mesh: {plain}; give their "
                                  "modules a `tensor_parallel_plan` (or a replicated style)")


def block_plan(block: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """A `TransformerBlock`'s plan (relative names): its norms, the layout changes around its
    two sublayers, and each sublayer's own `tensor_parallel_plan`."""
    stream = SEQUENCE if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "attention_norm": _norm(sequence_parallel),
        "ffn_norm": _norm(sequence_parallel),
        "attention": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
    }
    plan.update(_prefixed("attention", block.attention.tensor_parallel_plan(output_layout=stream)))
    plan["feed_forward"] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),))
    # after the gather: a plan with an entry for "" (the MoE's) replaces it and takes the stream itself
    plan.update(_prefixed("feed_forward", block.feed_forward.tensor_parallel_plan(output_layout=stream)))
    return plan


def mtp_plan(module: nn.Module, *, stream: Placement) -> dict[str, ParallelStyle]:
    """A multi-token prediction module without sequence parallelism: its inputs (the main
    hidden states and the embeddings of tokens k ahead, both T-k long, in the main stream's
    layout) are gathered, its norms and projection replicated, its block split without
    sequence parallelism."""
    plan: dict[str, ParallelStyle] = {
        "": PrepareModuleInput(input_layouts=(stream, stream, None),
                               desired_input_layouts=(Replicate(), Replicate(), None)),
        "embed_norm": replicated(), "hidden_norm": replicated(), "head_norm": replicated(), "proj": replicated(),
    }
    plan.update(_prefixed("block", block_plan(module.block, sequence_parallel=False)))
    return plan


def tensor_parallel_faults(model: Any, tp: int, *, seq_len: int | None = None) -> list[str]:
    """Why `model` (a built `DecoderLM` or its fiddle config) cannot be split over `tp` ranks,
    each fault naming the config path, the constraint and a fix; [] when it can.

    Every attention and feed-forward must be a `TensorParallel` block, and tp must divide the
    arguments its `tensor_parallel_divides` names (heads, hidden widths; its
    `tensor_parallel_parts` are checked the same way); the vocabulary is split evenly too.
    `seq_len`, if given, must divide by tp for sequence parallelism. A model that is not a
    DecoderLM gets one fault saying so."""
    if tp < 1:
        return [f"tp={tp}: use a degree >= 1"]
    if tp == 1:
        return []
    from tessera.components.model.decoder import DecoderLM  # here: the decoder module is not needed to split blocks

    kind = _kind(model)
    if isinstance(kind, type) and not issubclass(kind, DecoderLM):  # a factory config is judged by what it sets
        return [f"model is a {kind.__name__}, not a DecoderLM: tensor parallelism splits a DecoderLM's embedding, "
                f"layers, norm and head by their names; build the model as a DecoderLM "
                f"(tessera.components.model.decoder) or use tp=1"]
    faults = []
    vocab = _get(model, "vocab_size")
    if vocab % tp:
        faults.append(f"model.vocab_size={vocab} is not divisible by tp={tp}: the embedding and head split the "
                      f"vocabulary evenly; pad the vocabulary to a multiple of {tp}")
    if position_kind(_get(model, "position")) == "absolute" or isinstance(_get(model, "position"), AbsoluteEncoding):
        faults.append("model.position is an absolute encoding, which has no tensor-parallel plan; use rotary "
                      "positions on the attentions or tp=1")
    if seq_len is not None and seq_len % tp:
        faults.append(f"seq_len={seq_len} is not divisible by tp={tp}: sequence parallelism gives each rank "
                      f"seq_len / tp positions; use a multiple of {tp}")
    blocks = [(f"model.layers[{i}]", layer) for i, layer in enumerate(_get(model, "layers"))]
    blocks += [(f"model.mtp[{i}].block", _get(m, "block")) for i, m in enumerate(_get(model, "mtp") or [])]
    for path, block in blocks:
        faults += _attention_faults(f"{path}.attention", _get(block, "attention"), tp)
        faults += _feed_forward_faults(f"{path}.feed_forward", _get(block, "feed_forward"), tp)
    return faults


def _norm(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel(use_local_output=False) if sequence_parallel else replicated()


def _head(stream: Placement, loss_parallel: bool) -> ParallelStyle:
    if loss_parallel:
        return ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    return ColwiseParallel(input_layouts=stream, output_layouts=Replicate(), use_local_output=True)


def _prefixed(prefix: str, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    return {(f"{prefix}.{name}" if name else prefix): style for name, style in plan.items()}


def _get(node: Any, name: str) -> Any:
    """An attribute of a built module or an argument of a fiddle config (its default if unset)."""
    import fiddle as fdl

    if isinstance(node, fdl.Buildable):
        if name in node.__arguments__:
            return node.__arguments__[name]
        default = _signature(node.__fn_or_cls__).get(name)
        return None if default is None or default.default is default.empty else default.default
    return getattr(node, name, None)


def _kind(node: Any) -> type:
    import fiddle as fdl

    return node.__fn_or_cls__ if isinstance(node, fdl.Buildable) else type(node)


def _attention_faults(path: str, attention: Any, tp: int) -> list[str]:
    faults = _block_faults(path, attention, tp, instead="gqa or mla attention")
    if _has_plan(_kind(attention)) and position_kind(_get(attention, "position")) == "additive":
        faults.append(f"{path}.position is an additive score bias (e.g. ALiBi), whose per-head slopes are not split "
                      "over tp ranks; use rotary positions or tp=1")
    return faults


def _feed_forward_faults(path: str, feed_forward: Any, tp: int) -> list[str]:
    return _block_faults(path, feed_forward, tp, instead="mlp, a gated MLP or moe")


def _block_faults(path: str, block: Any, tp: int, *, instead: str) -> list[str]:
    """A block (config or module) that cannot split over `tp` ranks: it is no `TensorParallel`,
    tp does not divide an argument of its `tensor_parallel_divides`, or one of its
    `tensor_parallel_parts` (checked the same way) cannot split."""
    kind = _kind(block)
    if not _has_plan(kind):
        return [f"{path} is a {getattr(kind, '__name__', kind)}, which has no tensor-parallel plan (it does not "
                f"implement tessera.components.interfaces.TensorParallel); use {instead}, or tp=1"]
    faults = []
    for name in kind.tensor_parallel_divides:
        count = _get(block, name)
        if count is None or count % tp == 0:
            continue
        if name in HEAD_COUNTS:
            faults.append(f"{path}.{name}={count} is not divisible by tp={tp}: tensor parallelism gives each rank "
                          f"{name} / tp heads; use a tp that divides {name} (divisors: "
                          f"{[d for d in range(1, count + 1) if count % d == 0]})")
        else:
            faults.append(f"{path}.{name}={count} is not divisible by tp={tp}: tensor parallelism splits {name} "
                          f"evenly over the tp ranks; use a multiple of {tp}")
    for name in kind.tensor_parallel_parts:
        part = _get(block, name)
        faults += [] if part is None else _block_faults(f"{path}.{name}", part, tp, instead=instead)
    return faults


def _has_plan(kind: Any) -> bool:
    """Whether blocks of `kind` (a class; a factory's config is not judged by its return) split themselves."""
    return isinstance(kind, type) and issubclass(kind, TensorParallel)


def _signature(kind: Any) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(kind).parameters
