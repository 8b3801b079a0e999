"""Communication per training step, by collective, for one rank under a planned layout.

Bytes are payloads: the size of the buffer each rank hands to the collective (an all-gather
counts its gathered output, a reduce-scatter its full input), summed over the step. A ring
moves about 2(n-1)/n of an all-reduce's payload and (n-1)/n of an all-gather's or
reduce-scatter's over each rank's link.
"""

from __future__ import annotations

from torch import nn

from tessera.components.train.planner import PlannedLayout, Precision, split_parameters, stage_owners

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "point-to-point")


def per_step(model: nn.Module, layout: PlannedLayout, precision: Precision, *, n_micro: int, tokens: int,
             dim: int, moe_layers: int, top_k: int) -> dict[str, float]:
    """Bytes per step on the busiest pipeline rank, keyed by `KINDS`.

    n_micro: micro-batches per step on each rank; tokens: tokens per micro-batch.
    - Data parallel, replicated (DDP; ZeRO-1): one all-reduce of the local gradients per step
      over dp_replicate (experts over their own data-parallel group); ZeRO-1 adds an
      all-gather of the updated parameters (each rank stepped 1/dp of them).
    - FSDP (dp_shard > 1): per micro-batch, an all-gather of each unit for the forward and
      again for the backward (once when not resharding after the forward), and a
      reduce-scatter of its gradients; HSDP adds an all-reduce of the gradient shards over
      dp_replicate.
    - Tensor + sequence parallel: per layer and micro-batch, 2 all-gathers and 2
      reduce-scatters of the [tokens, dim] activations forward, as many backward (arXiv:2205.05198 §4.2.2).
    - Expert parallel: per MoE layer and micro-batch, an all-to-all dispatch and combine of the
      tokens' top_k copies forward, the same backward; (ep-1)/ep of them leave the rank.
    - Pipeline: per micro-batch, what the busiest rank sends: each of its stages' activations
      to a next stage on another rank and their gradients back to a previous one (a middle
      rank of 1F1B: one each; an end rank: one; the first rank of DualPipeV's V: one of each
      direction), twice with MTP (the token embeddings travel too).
    """
    out = dict.fromkeys(KINDS, 0.0)
    split = max(split_parameters(model, layout), key=lambda s: s.dense + s.expert)
    act = precision.activation
    # expert-parallel experts are outside FSDP / DDP / ZeRO-1: their copies all-reduce their
    # accumulated gradients once per step
    managed = split.dense + (split.expert if layout.ep == 1 else 0.0)
    if layout.ep > 1 and layout.expert_dp > 1:
        out["all-reduce"] += split.expert * precision.grad
    if layout.dp_shard > 1:
        gathers = 1 if not layout.reshard_after_forward else 2
        out["all-gather"] += n_micro * gathers * managed * precision.param
        # a pipeline schedule holds FSDP's gradient sync until the step's last backward
        out["reduce-scatter"] += (1 if layout.pp > 1 else n_micro) * managed * precision.grad
        if layout.dp_replicate > 1:
            out["all-reduce"] += managed / layout.dp_shard * precision.grad
    else:
        if layout.dp_replicate > 1:
            out["all-reduce"] += managed * precision.grad
        if layout.zero1:
            out["all-gather"] += managed * precision.param
    layers_here = len(model.layers) / layout.pp
    if layout.tp > 1:
        per = tokens * dim * act
        out["all-gather"] += n_micro * layers_here * 4 * per
        out["reduce-scatter"] += n_micro * layers_here * 4 * per
    if layout.ep > 1 and moe_layers:
        leaving = (layout.ep - 1) / layout.ep
        moe_here = moe_layers / layout.pp
        out["all-to-all"] += n_micro * moe_here * 4 * tokens * top_k * dim * act * leaving / layout.tp
    if layout.pp > 1:
        # each tensor a stage hands to a stage on another rank: activations forward (all but
        # the last stage), their gradients backward (all but the first); with MTP the token
        # embeddings travel beside the hidden states (tessera.components.parallel.pipeline)
        hops = 2 if len(getattr(model, "mtp", None) or []) else 1
        owner = stage_owners(layout)
        sends = [0] * layout.pp
        for stage, rank in enumerate(owner):
            forward = stage + 1 < len(owner) and owner[stage + 1] != rank
            backward = stage > 0 and owner[stage - 1] != rank
            sends[rank] += int(forward) + int(backward)
        out["point-to-point"] += n_micro * max(sends) * hops * tokens * dim * act / layout.tp
    return out
