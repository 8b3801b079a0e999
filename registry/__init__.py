"""Typed registries and the config machinery: registration, validation, overrides, serialization.

    from tessera.registry import ATTENTION, validate
    cfg = ATTENTION.config("gqa", dim=256, n_heads=8, n_kv_heads=2)
"""

from tessera.registry.errors import ConfigError, Fault, RegistryError
from tessera.registry.invariants import invariant
from tessera.registry.kinds import (
    ATTENTION,
    COMM_HOOK,
    DATA_ENGINE,
    DATA_FILTER,
    DATA_SOURCE,
    FEED_FORWARD,
    NORM,
    OPTIMIZER,
    PARALLEL_PLAN,
    PERIODIC_SYNC,
    POSITION,
    PRECISION,
    SCHEDULER,
)
from tessera.registry.registry import Registry, Shared, all_registries
from tessera.registry.tags import ModelDim, Setting, model_width
from tessera.registry.validate import validate

__all__ = [
    "ATTENTION", "COMM_HOOK", "DATA_ENGINE", "DATA_FILTER", "DATA_SOURCE", "FEED_FORWARD", "NORM", "OPTIMIZER",
    "PARALLEL_PLAN", "PERIODIC_SYNC", "POSITION",
    "PRECISION", "SCHEDULER",
    "ConfigError", "Fault", "ModelDim", "Registry", "RegistryError", "Setting", "Shared", "all_registries",
    "invariant", "model_width", "validate",
]
