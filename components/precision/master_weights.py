"""An optimizer wrapper that updates fp32 master copies of low-precision parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tessera.components.optim.facade import OptimizerFront


class MasterWeights(OptimizerFront):
    """Runs `inner` on fp32 master copies of the model's bf16/fp16 parameters.

    The model keeps low-precision parameters and gradients (what forward and backward
    touch); this wrapper keeps, per such parameter, an fp32 master copy, and the inner
    optimizer's state (moments etc.) is created and kept in fp32. A step swaps each
    parameter's storage for its master, hands the inner optimizer the gradient in fp32,
    steps, and rounds the master back into the parameter. Updates smaller than the
    parameter's bf16 resolution therefore accumulate in the master instead of vanishing.

    `param_groups` and `state` are the inner optimizer's own (keyed by the model's
    parameters), so LR schedules, `torch.distributed.checkpoint.state_dict` and
    checkpoints see an ordinary optimizer; the master copy is saved as each parameter's
    "master" state entry (present from the first step on).
    """

    def __init__(self, inner: torch.optim.Optimizer):
        self.inner = inner
        super().__init__(defaults=inner.defaults)
        params = [p for group in inner.param_groups for p in group["params"]]
        self._masters = {p: p.detach().float() for p in params if p.is_floating_point() and p.dtype != torch.float32}

    # the inner optimizer's own, read on every access (ZeRO-1's `state` is a fresh mapping each time)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        self.inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        # the inner optimizer's (ZeRO-1 gathers its partitions there), "master" entries included
        return self.inner.state_dict()

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Within: each low-precision parameter holds its fp32 master (and an fp32 gradient);
        on exit the masters are rounded back into the parameters' own storage."""
        saved = {}
        for p, master in self._masters.items():
            saved[p] = (p.data, p.grad)
            p.grad = None
            p.data = master
            if saved[p][1] is not None:
                p.grad = saved[p][1].float()
        try:
            yield
        finally:
            for p, (data, grad) in saved.items():
                data.copy_(p.data)
                p.grad = None
                p.data = data
                p.grad = grad

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            raise ValueError("MasterWeights does not take a closure: compute the loss and backward before step()")
        with self.full_precision():
            self.inner.step()
        for p, master in self._masters.items():
            if self.state.get(p):  # the inner optimizer has created this parameter's state
                self.state[p]["master"] = master
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Loaded under full precision, so torch keeps the state in fp32 (it casts optimizer
        # state to each parameter's dtype) and the saved masters land in the master copies.
        # A state without masters (written by another precision policy) starts them from the
        # parameters as they stand, i.e. as the model was just loaded.
        loaded = {p: p.detach().float() for p in self._masters}
        with torch.no_grad(), self.full_precision():
            self.inner.load_state_dict(state_dict)
            for p, master in self._masters.items():
                state = self.state.get(p)
                saved = state.get("master") if state else None
                master.copy_(saved if torch.is_tensor(saved) else loaded[p])
                if state:
                    state["master"] = master

    def __getattr__(self, name: str) -> Any:
        # Optimizer-specific extras (e.g. Sophia's `update_hessian`, `hessian_interval`) come
        # from the inner optimizer; methods run with the masters and fp32 gradients in place.
        if name == "inner":
            raise AttributeError(name)
        value = getattr(self.inner, name)
        if not callable(value):
            return value

        def in_full_precision(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad(), self.full_precision():
                return value(*args, **kwargs)

        return in_full_precision
