"""One registry per kind of component. Later kinds (data stages, losses, ...) are added here."""

from __future__ import annotations

import torch

from components.interfaces import (
    Attention,
    DataSource,
    DocumentFilter,
    FeedForward,
    Norm,
    ParallelPlan,
    PositionEncoding,
    PrecisionPolicy,
    Schedule,
)
from registry.registry import Registry

ATTENTION: Registry[Attention] = Registry(kind="ATTENTION", base=Attention)
FEED_FORWARD: Registry[FeedForward] = Registry(kind="FEED_FORWARD", base=FeedForward)
NORM: Registry[Norm] = Registry(kind="NORM", base=Norm)
POSITION: Registry[PositionEncoding] = Registry(kind="POSITION", base=PositionEncoding)
PARALLEL_PLAN: Registry[ParallelPlan] = Registry(kind="PARALLEL_PLAN", base=ParallelPlan)
OPTIMIZER: Registry[torch.optim.Optimizer] = Registry(kind="OPTIMIZER", base=torch.optim.Optimizer)
SCHEDULER: Registry[Schedule] = Registry(kind="SCHEDULER", base=Schedule)
DATA_SOURCE: Registry[DataSource] = Registry(kind="DATA_SOURCE", base=DataSource)
DATA_FILTER: Registry[DocumentFilter] = Registry(kind="DATA_FILTER", base=DocumentFilter)
PRECISION: Registry[PrecisionPolicy] = Registry(kind="PRECISION", base=PrecisionPolicy)
