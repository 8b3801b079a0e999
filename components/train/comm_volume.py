"""Communication per training step, by collective, for one rank under a parallel `Layout`.

Bytes are payloads: the size of the buffer each rank hands to the collective (an all-gather
counts its gathered output, a reduce-scatter its full input), summed over the step. A ring
moves about 2(n-1)/n of an all-reduce's payload and (n-1)/n of an all-gather's or
reduce-scatter's over each rank's link.
"""

from __future__ import annotations

from torch import nn

from tessera.components.interfaces import ElementBytes
from tessera.components.parallel.layout import Layout
from tessera.components.train.memory_model import RankParameters, rank_parameters

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "point-to-point")


def per_step(model: nn.Module, layout: Layout, element: ElementBytes, *, n_micro: int, tokens: int,
             dim: int, moe_layers: int, top_k: int) -> dict[str, float]:
    """Bytes per step on the busiest pipeline rank, keyed by `KINDS`.

    n_micro: micro-batches per step on each rank; tokens: tokens per micro-batch; dim: the
    residual stream's width; moe_layers, top_k: the main model's routed-expert layers and how
    many experts each token visits. Data parallelism: `_data_parallel`; tensor, expert and
    pipeline parallelism: `_tensor_and_expert_parallel`, `_pipeline_sends`.
    """
    out = dict.fromkeys(KINDS, 0.0)
    params = max(rank_parameters(model, layout), key=lambda s: s.dense + s.expert)
    _data_parallel(out, params, layout, element, n_micro=n_micro)
    _tensor_and_expert_parallel(out, layout, element, n_layers=len(model.layers), n_micro=n_micro, tokens=tokens,
                                dim=dim, moe_layers=moe_layers, top_k=top_k)
    if layout.pp > 1:
        hops = 2 if len(getattr(model, "mtp", None) or []) else 1
        out["point-to-point"] += n_micro * _pipeline_sends(layout) * hops * tokens * dim * element.activation / \
            layout.tp
    return out


def _data_parallel(out: dict[str, float], params: RankParameters, layout: Layout, element: ElementBytes, *,
                   n_micro: int) -> None:
    """Add the data-parallel collectives of the rank holding `params` to `out`.

    - Replicated (DDP; ZeRO-1): one all-reduce of the local gradients per step over
      dp_replicate; ZeRO-1 adds an all-gather of the updated parameters (each rank stepped
      1/dp of them).
    - FSDP (dp_shard > 1): per micro-batch, an all-gather of each unit for the forward and
      again for the backward (once when not resharding after the forward), and a
      reduce-scatter of its gradients (once per step under a pipeline schedule, which holds
      the sync until the step's last backward); HSDP adds an all-reduce of the gradient
      shards over dp_replicate.
    - Expert-parallel experts are outside FSDP / DDP / ZeRO-1: their copies all-reduce their
      accumulated gradients once per step.
    """
    managed = params.dense + (params.expert if layout.ep == 1 else 0.0)
    if layout.ep > 1 and layout.expert_dp > 1:
        out["all-reduce"] += params.expert * element.gradient
    if layout.dp_shard > 1:
        gathers = 1 if not layout.reshard_after_forward else 2
        out["all-gather"] += n_micro * gathers * managed * element.parameter
        out["reduce-scatter"] += (1 if layout.pp > 1 else n_micro) * managed * element.gradient
        if layout.dp_replicate > 1:
            out["all-reduce"] += managed / layout.dp_shard * element.gradient
    else:
        if layout.dp_replicate > 1:
            out["all-reduce"] += managed * element.gradient
        if layout.zero1:
            out["all-gather"] += managed * element.parameter


def _tensor_and_expert_parallel(out: dict[str, float], layout: Layout, element: ElementBytes, *, n_layers: int,
                                n_micro: int, tokens: int, dim: int, moe_layers: int, top_k: int) -> None:
    """Add the tensor- and expert-parallel collectives to `out`, layers spread evenly over pp.

    - Tensor + sequence parallel: per layer and micro-batch, 2 all-gathers and 2
      reduce-scatters of the [tokens, dim] activations forward, as many backward
      (arXiv:2205.05198 §4.2.2).
    - Expert parallel: per MoE layer and micro-batch, an all-to-all dispatch and combine of
      the tokens' top_k copies forward, the same backward; (ep-1)/ep of them leave the rank.
    """
    act = element.activation
    if layout.tp > 1:
        per, layers_here = tokens * dim * act, n_layers / layout.pp
        out["all-gather"] += n_micro * layers_here * 4 * per
        out["reduce-scatter"] += n_micro * layers_here * 4 * per
    if layout.ep > 1 and moe_layers:
        leaving = (layout.ep - 1) / layout.ep
        out["all-to-all"] += n_micro * (moe_layers / layout.pp) * 4 * tokens * top_k * dim * act * leaving / layout.tp


def _pipeline_sends(layout: Layout) -> int:
    """Tensors the busiest pipeline rank sends per micro-batch: each of its stages' activations
    to a next stage on another rank, their gradients back to a previous one (a middle rank of
    1F1B: one each; an end rank: one; the first rank of DualPipeV's V: one of each direction).
    With MTP every hop carries the token embeddings beside the hidden states
    (`tessera.components.parallel.pipeline`), counted by the caller."""
    owner = layout.stage_owners()
    sends = [0] * layout.pp
    for stage, rank in enumerate(owner):
        forward = stage + 1 < len(owner) and owner[stage + 1] != rank
        backward = stage > 0 and owner[stage - 1] != rank
        sends[rank] += int(forward) + int(backward)
    return max(sends)
