"""Imports every built-in component module so that their registrations run.

The registries import this lazily on first lookup; add new component modules here.
"""

import components.attention.block_sparse  # noqa: F401
import components.attention.gqa  # noqa: F401
import components.attention.linear  # noqa: F401
import components.attention.mla  # noqa: F401
import components.attention.sliding_window  # noqa: F401
import components.data.filters.heuristics  # noqa: F401
import components.data.filters.language  # noqa: F401
import components.data.filters.quality  # noqa: F401
import components.data.sources.files  # noqa: F401
import components.data.sources.stdlib  # noqa: F401
import components.mlp.gated  # noqa: F401
import components.mlp.mlp  # noqa: F401
import components.moe.moe  # noqa: F401
import components.norm.layernorm  # noqa: F401
import components.norm.rmsnorm  # noqa: F401
import components.optim.adafactor  # noqa: F401
import components.optim.adamw  # noqa: F401
import components.optim.lamb  # noqa: F401
import components.optim.muon  # noqa: F401
import components.optim.sophia  # noqa: F401
import components.optim.sophia_h  # noqa: F401
import components.parallel.diloco  # noqa: F401
import components.parallel.fsdp  # noqa: F401
import components.parallel.hooks.fp16  # noqa: F401
import components.parallel.hooks.one_bit  # noqa: F401
import components.parallel.hooks.powersgd  # noqa: F401
import components.parallel.mesh  # noqa: F401
import components.parallel.single  # noqa: F401
import components.position.absolute  # noqa: F401
import components.position.alibi  # noqa: F401
import components.position.rope  # noqa: F401
import components.position.yarn  # noqa: F401
import components.precision.auto  # noqa: F401
import components.precision.policies  # noqa: F401
import components.schedule.basic  # noqa: F401
import components.schedule.multi_stage  # noqa: F401
import components.schedule.warmup_cosine  # noqa: F401
