"""Two optimizers over disjoint parameters stepped as one: ZeRO-1 over the dense parameters and
a plain optimizer over the routed experts, when expert parallelism runs beside ZeRO-1
(DeepSeek-V3's layout, arXiv:2412.19437 §3.2: ZeRO-1 data parallelism with 64-way expert
parallelism).

Why not one ZeRO-1 optimizer over everything: ZeRO-1 has each process step a partition of
the parameters and broadcast it to the others, which is right only for parameters every
process holds the same copy of. A process's expert weights are its own slice (a DTensor on
the ep mesh), so they are stepped where they live, by every process, and their state is
already split ep ways.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from tessera.components.optim.facade import OptimizerFront


class SplitOptimizer(OptimizerFront):
    """`first` and `second` (optimizers over disjoint parameters) behind one optimizer's API.

    - `param_groups`: first's groups, then second's (the very group dicts, so setting a
      group's "lr" reaches the optimizer that owns it);
    - `state`: both states merged; `step`/`zero_grad`: both;
    - `state_dict()`: torch's format with parameter indices numbered through first's groups,
      then second's: the order `param_groups` lists them in, which is how
      torch.distributed.checkpoint maps indices to parameter names, so the checkpoint holds
      the same entries as a single-process run's and resumes under any other layout;
    - `load_state_dict(d)`: d's groups are split by position between the two.
    """

    def __init__(self, *, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        super().__init__(defaults=first.defaults)
        self.parts = (first, second)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [*self.parts[0].param_groups, *self.parts[1].param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        raise AttributeError("SplitOptimizer: set the groups of its parts")

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:  # type: ignore[override]
        return defaultdict(dict, {**self.parts[0].state, **self.parts[1].state})

    @state.setter
    def state(self, value: Any) -> None:
        return None  # each part keeps its own

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("SplitOptimizer.step takes no closure (it would run the model twice)")
        for part in self.parts:
            part.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        first, second = (part.state_dict() for part in self.parts)
        offset = sum(len(group["params"]) for group in first["param_groups"])
        return {"state": {**first["state"], **{key + offset: value for key, value in second["state"].items()}},
                "param_groups": [*first["param_groups"],
                                 *({**group, "params": [key + offset for key in group["params"]]}
                                   for group in second["param_groups"])]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        n_first = len(self.parts[0].param_groups)
        groups = state_dict["param_groups"]
        if len(groups) != n_first + len(self.parts[1].param_groups):
            raise ValueError(f"SplitOptimizer: the state has {len(groups)} parameter groups, this optimizer "
                             f"{n_first} + {len(self.parts[1].param_groups)}")
        for part, own in zip(self.parts, (groups[:n_first], groups[n_first:]), strict=True):
            keys = {key for group in own for key in group["params"]}
            part.load_state_dict({"state": {k: v for k, v in state_dict["state"].items() if k in keys},
                                  "param_groups": own})


def split_groups(optimizer: torch.optim.Optimizer, second: set[torch.nn.Parameter]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`optimizer`'s parameter groups split into those without and those with the parameters
    in `second` (each group keeps its settings; groups left empty are dropped)."""
    without, within = [], []
    for group in optimizer.param_groups:
        for out, keep in ((without, lambda p: p not in second), (within, lambda p: p in second)):
            params = [p for p in group["params"] if keep(p)]
            if params:
                out.append({**group, "params": params})
    return without, within
