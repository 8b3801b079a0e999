"""One registry per kind of component, each with the arguments its entries share.

A kind's shared arguments are those every entry reads with one meaning (the model width, the
number of heads, the position encoding, ...). A swap such as `model.layers[*].attention=@gqa`
carries over only these, plus those both entries inherit from a common class (a sliding-window
attention is a grouped-query attention, so its QK-norms mean the same); an argument that only
shares a name (MLA's query-latent `q_norm` against GQA's per-head QK-norm) is left behind.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.components.interfaces import (
    Attention,
    CommHook,
    DataEngine,
    DataSource,
    DocumentFilter,
    FeedForward,
    Norm,
    ParallelPlan,
    PeriodicSync,
    PositionEncoding,
    PrecisionPolicy,
    Schedule,
    position_kind,
)
from tessera.registry.registry import Registry, Shared


def _position_fits(target: Any, value: Any) -> bool:
    """An attention takes only the position kinds it lists in `supported_positions`."""
    supported = getattr(target, "supported_positions", None)
    return value is None or supported is None or position_kind(value) in supported


ATTENTION: Registry[Attention] = Registry(kind="ATTENTION", base=Attention, shared={
    "dim": Shared(meaning="model width D (input and output)"),
    "n_heads": Shared(meaning="query heads H"),
    "n_kv_heads": Shared(meaning="key/value heads (grouped-query sharing)"),
    "head_dim": Shared(meaning="per-head width of queries, keys and values"),
    "position": Shared(meaning="position encoding applied inside attention", fits=_position_fits),
    "bias": Shared(meaning="whether the projections have biases"),
    "dropout": Shared(meaning="dropout probability on the attention weights"),
})
FEED_FORWARD: Registry[FeedForward] = Registry(kind="FEED_FORWARD", base=FeedForward, shared={
    "dim": Shared(meaning="model width D (input and output)"),
    "hidden_dim": Shared(meaning="inner width F of a dense feed-forward"),
    "bias": Shared(meaning="whether the projections have biases"),
    "dropout": Shared(meaning="dropout probability on the output"),
})
NORM: Registry[Norm] = Registry(kind="NORM", base=Norm, shared={
    "dim": Shared(meaning="width of the normalised (last) dimension"),
    "eps": Shared(meaning="added to the variance for stability"),
})
POSITION: Registry[PositionEncoding] = Registry(kind="POSITION", base=PositionEncoding, shared={
    "theta": Shared(meaning="rotary base frequency"),
    "interleaved": Shared(meaning="rotary pairs are adjacent channels (else the two halves)"),
    "max_len": Shared(meaning="longest sequence a learned table covers"),
    "dim": Shared(meaning="model width D of an absolute encoding"),
})
PARALLEL_PLAN: Registry[ParallelPlan] = Registry(kind="PARALLEL_PLAN", base=ParallelPlan)
COMM_HOOK: Registry[CommHook] = Registry(kind="COMM_HOOK", base=CommHook)
PERIODIC_SYNC: Registry[PeriodicSync] = Registry(kind="PERIODIC_SYNC", base=PeriodicSync)
OPTIMIZER: Registry[torch.optim.Optimizer] = Registry(kind="OPTIMIZER", base=torch.optim.Optimizer, shared={
    "lr": Shared(meaning="base learning rate (schedules multiply it)"),
    "weight_decay": Shared(meaning="decoupled weight decay coefficient"),
}, call_arguments=("params",))
SCHEDULER: Registry[Schedule] = Registry(kind="SCHEDULER", base=Schedule, shared={
    "warmup_steps": Shared(meaning="steps of linear warmup from 0"),
    "total_steps": Shared(meaning="steps the schedule spans"),
    "min_ratio": Shared(meaning="final value as a fraction of the peak"),
})
DATA_SOURCE: Registry[DataSource] = Registry(kind="DATA_SOURCE", base=DataSource, shared={
    "domain": Shared(meaning="mixture domain the documents belong to"),
})
DATA_FILTER: Registry[DocumentFilter] = Registry(kind="DATA_FILTER", base=DocumentFilter)
DATA_ENGINE: Registry[DataEngine] = Registry(kind="DATA_ENGINE", base=DataEngine)
PRECISION: Registry[PrecisionPolicy] = Registry(kind="PRECISION", base=PrecisionPolicy)
