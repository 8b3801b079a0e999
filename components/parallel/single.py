"""The trivial parallel plan: one process, the model unchanged."""

from __future__ import annotations

from torch import nn

from tessera.components.interfaces import ParallelPlan, PrecisionPolicy
from tessera.components.parallel.layout import Layout
from tessera.registry.kinds import PARALLEL_PLAN


@PARALLEL_PLAN.register("single")
class SingleProcess(ParallelPlan):
    """Trains in the current process without wrapping or sharding."""

    def apply(self, model: nn.Module, *, precision: PrecisionPolicy | None = None,
              device: str = "cpu") -> nn.Module:
        return model

    def layout(self, model: nn.Module, *, world_size: int) -> Layout:
        """One process holding the whole model, whatever `world_size` is: under a launcher
        every process trains its own copy, alone."""
        return Layout()
