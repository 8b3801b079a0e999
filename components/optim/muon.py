"""Muon for hidden-layer matrices with AdamW for everything else (torch's own implementations)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.optim._muon as torch_muon

from tessera.components.interfaces import ParamGroups
from tessera.registry.kinds import OPTIMIZER


@OPTIMIZER.register("muon")
class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (orthogonalised momentum, torch.optim.Muon) on 2-D weight matrices of the hidden
    layers; AdamW on embeddings, the output head, norms, biases and 3-D expert stacks, as Muon
    is meant to be used. Parameter groups tagged kind="matrix" (see `decay_groups`) with 2-D
    tensors go to Muon, the rest to AdamW; both share this optimizer's `param_groups` and
    `state`, so schedules, checkpoints and `state_dict()` see one optimizer. With the default
    `adjust_lr_fn="match_rms_adamw"` Muon's `lr` is on AdamW's scale (torch rescales it per
    matrix); with `adjust_lr_fn=None` use Muon's original scale (about 0.02).

    `ns_dtype`: the dtype of the Newton-Schulz orthogonalisation. torch runs it in bf16, which
    CPUs without native bf16 (AVX2-only x86) run ~40x slower than fp32; "auto" keeps bf16
    where precision `auto` would pick it and computes in fp32 elsewhere (same iteration).
    """

    def __init__(self, params: ParamGroups, *, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.1,
                 adjust_lr_fn: str | None = "match_rms_adamw", adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 ns_dtype: Literal["auto", "bf16", "fp32"] = "auto"):
        self.ns_dtype = ns_dtype
        self._auto_fp32: bool | None = None  # resolved on the first step, from the parameters' device
        muon_groups: list[dict[str, Any]] = []
        adamw_groups: list[dict[str, Any]] = []
        for group in params if not isinstance(params, torch.Tensor) else [params]:
            group = dict(group) if isinstance(group, dict) else {"params": [group]}
            tensors = list(group.pop("params"))
            matrix = [p for p in tensors if p.ndim == 2 and group.get("kind", "matrix") == "matrix"]
            rest = [p for p in tensors if not any(p is m for m in matrix)]
            if matrix:
                muon_groups.append({**group, "params": matrix})
            if rest:
                adamw_groups.append({**group, "params": rest, "lr": adamw_lr})
        self._muon = torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      adjust_lr_fn=adjust_lr_fn) if muon_groups else None
        self._adamw = torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                                        weight_decay=weight_decay) if adamw_groups else None
        super().__init__([p for g in muon_groups + adamw_groups for p in g["params"]], {})
        self.param_groups = (self._muon.param_groups if self._muon else []) + \
            (self._adamw.param_groups if self._adamw else [])
        self._n_muon = len(muon_groups)
        self._share()

    def _share(self) -> None:
        """Point both sub-optimizers at this optimizer's state and at their slices of its groups."""
        for sub, groups in ((self._muon, self.param_groups[: self._n_muon]),
                            (self._adamw, self.param_groups[self._n_muon:])):
            if sub is not None:
                sub.state = self.state
                sub.param_groups = groups

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._orthogonalise_in(self._ns_fp32()):
            for sub in (self._muon, self._adamw):
                if sub is not None:
                    sub.step()
        return loss

    def _ns_fp32(self) -> bool:
        if self.ns_dtype != "auto":
            return self.ns_dtype == "fp32"
        if self._auto_fp32 is None:
            from tessera.components.precision.auto import choose

            device = self.param_groups[0]["params"][0].device.type if self.param_groups else "cpu"
            self._auto_fp32 = choose(device)[0].compute_dtype != torch.bfloat16
        return self._auto_fp32

    @staticmethod
    @contextlib.contextmanager
    def _orthogonalise_in(fp32: bool) -> Iterator[None]:
        """torch.optim.Muon looks its Newton-Schulz function up at call time: swap in the fp32 one."""
        if not fp32:
            yield
            return
        original = torch_muon._zeropower_via_newtonschulz
        torch_muon._zeropower_via_newtonschulz = newton_schulz_fp32
        try:
            yield
        finally:
            torch_muon._zeropower_via_newtonschulz = original

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._share()


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation of a 2-D `grad` in fp32: X <- G / ||G||
    (on the wide orientation), then `ns_steps` times X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(grad.dtype)
