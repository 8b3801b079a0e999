"""Imports every built-in component module so that their registrations run.

The registries import this lazily on first lookup; add new component modules here.
"""

import components.attention.gqa  # noqa: F401
import components.mlp.swiglu  # noqa: F401
import components.norm.layernorm  # noqa: F401
import components.norm.rmsnorm  # noqa: F401
import components.optim.adamw  # noqa: F401
import components.parallel.single  # noqa: F401
import components.position.rope  # noqa: F401
import components.schedule.warmup_cosine  # noqa: F401
