"""ZeRO-1 (Rajbhandari et al., arXiv:1910.02054, §5.1): the optimizer state is partitioned
across the data-parallel processes, parameters and gradients stay replicated.

Built on torch's `ZeroRedundancyOptimizer` over DDP: each process steps the optimizer for
its own partition of the parameters, then broadcasts the updated partition to the others.
Chosen over FSDP2 with unsharded parameters because it keeps the gradients replicated (so
DDP's communication hooks and the global gradient norm work unchanged) and the parameters
plain tensors.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from tessera.components.parallel.split_optimizer import SplitOptimizer, split_groups


class ShardedOptimizerState(ZeroRedundancyOptimizer):
    """`ZeroRedundancyOptimizer` that torch.distributed.checkpoint's `get_state_dict` /
    `set_state_dict` understand, so checkpoints written under ZeRO-1 resume under any other
    layout and the other way round.

    - `state_dict()` returns the whole optimizer state on every process (the partitions are
      all-gathered for the duration of the save; DCP writes each tensor once), in the format
      of the wrapped optimizer class, so the checkpoint holds the same entries as a
      single-process run's.
    - `load_state_dict(full)` keeps this process's partition only (torch's behaviour).
    - `state` is this process's partition (a fresh dict on each access, no copy of any
      tensor): `get_state_dict` reads it to see whether the state exists yet, and for which
      entries to unflatten a loaded state; a parameter of another partition reads as no state.
    """

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:  # type: ignore[override]
        local = getattr(self, "optim", None)
        return defaultdict(dict, local.state if local is not None else {})

    @state.setter
    def state(self, value: Any) -> None:
        # torch.optim.Optimizer assigns the whole state (at construction, and when loading:
        # then a second copy of this partition); the partition lives in the local optimizer.
        return None

    def state_dict(self) -> dict[str, Any]:
        self._sync_param_groups(self.param_groups, self.optim.param_groups)
        partitions: list[Any] = [None] * self.world_size
        dist.all_gather_object(partitions, self.optim.state_dict(), group=self.process_group)
        self._all_state_dicts = partitions
        try:
            return super().state_dict()
        finally:
            self._all_state_dicts = []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # DCP's `set_state_dict` hands over the state keyed by parameter name, each group
        # listing names in this optimizer's parameter order (torch.optim.Optimizer matches
        # groups by position); ZeroRedundancyOptimizer looks parameters up by global index.
        index: dict[Any, int] = {}
        for saved, live in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for key, param in zip(saved["params"], live["params"], strict=True):
                index[key] = self._param_to_index[param]
        super().load_state_dict({
            "state": {index[key]: value for key, value in state_dict["state"].items()},
            "param_groups": [{**group, "params": [index[key] for key in group["params"]]}
                             for group in state_dict["param_groups"]]})


def shard_optimizer_state(optimizer: torch.optim.Optimizer, process_group: Any, *,
                          local: set[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """A ZeRO-1 optimizer of `optimizer`'s class and hyperparameters over the same parameter
    groups, its state partitioned across `process_group`. `optimizer` must not have stepped
    (its state would be dropped).

    `local`: parameters each process holds its own slice of (expert-parallel experts): they
    get a plain optimizer of the same class, stepped on every process, beside ZeRO-1 over the
    rest (`tessera.components.parallel.split_optimizer`)."""
    if optimizer.state:
        raise ValueError("ZeRO-1 shards a fresh optimizer; this one already holds state")
    if not optimizer.defaults:  # e.g. MuonWithAdamW: its settings live in the optimizers it combines
        raise ValueError(f"parallel.zero1: the optimizer {type(optimizer).__name__} keeps its settings in the "
                         f"optimizers it combines, so it cannot be rebuilt for each process's partition; use "
                         f"dp_shard (FSDP also shards the optimizer state) instead of zero1, or a single "
                         f"optimizer such as @adamw")
    # the hyperparameters the class's constructor takes (some keep derived ones in `defaults`)
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    dense, own = split_groups(optimizer, local or set())
    try:
        sharded = ShardedOptimizerState(dense, optimizer_class=type(optimizer), process_group=process_group,
                                        **defaults)
        return SplitOptimizer(first=sharded, second=type(optimizer)(own, **defaults)) if own else sharded
    except TypeError as err:  # a class whose constructor needs more than its `defaults` hold
        raise ValueError(f"parallel.zero1: cannot rebuild the optimizer {type(optimizer).__name__} for each process's "
                         f"partition from its settings ({err}); use zero1 with an optimizer built from its "
                         f"hyperparameters alone (e.g. @adamw), or drop zero1") from err
