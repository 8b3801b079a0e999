"""A base for optimizers that front other optimizers (fp32 masters, ZeRO-1 beside experts).

torch's `Optimizer.__init__` builds parameter groups and state of its own; a front must not:
its `param_groups` and `state` are its inner optimizers' (read on every access, since an
inner one such as ZeRO-1's may hand out a fresh `state` mapping each time), so LR schedules,
gradient clipping and `torch.distributed.checkpoint` see the live objects.
"""

from __future__ import annotations

from typing import Any

import torch


class OptimizerFront(torch.optim.Optimizer):
    """Sets up only the hook tables of `torch.optim.Optimizer`; subclasses define
    `param_groups`, `state`, `step`, `zero_grad`, `state_dict` and `load_state_dict`."""

    def __init__(self, *, defaults: dict[str, Any]):  # noqa: D107 - torch's __init__ is skipped on purpose
        self.defaults = defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}
