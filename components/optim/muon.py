"""Muon for hidden-layer matrices with AdamW for everything else (torch's own implementations)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.optim._muon as torch_muon

from tessera.components.interfaces import ParamGroups
from tessera.components.optim.adamw import adamw
from tessera.components.optim.muon_experts import StackedMuon
from tessera.components.optim.state_size import ADAMW_STATE_TENSORS
from tessera.registry.kinds import OPTIMIZER


@OPTIMIZER.register("muon")
class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (orthogonalised momentum, torch.optim.Muon) on 2-D weight matrices of the hidden
    layers; AdamW on embeddings, the output head, norms, biases and (by default) 3-D expert
    stacks, as Muon is meant to be used. `expert_stacks="muon"` gives each expert's matrix of a
    3-D stack [n_experts, rows, cols] its own Muon update instead (`StackedMuon`; Moonlight,
    arXiv:2502.16982, trains MoE experts with Muon). `batched=True` sends the 2-D matrices through
    `StackedMuon` too: the same update, with one Newton-Schulz iteration per matrix shape rather
    than per matrix (much faster where small matrices' per-call cost dominates, as on CPUs).
    Parameter groups tagged kind="matrix" (see `decay_groups`) with 2-D tensors go to Muon, the
    rest to AdamW; both share this optimizer's `param_groups` and `state` (and `StackedMuon`'s),
    so schedules, checkpoints and `state_dict()` see one optimizer. With the default
    `adjust_lr_fn="match_rms_adamw"` Muon's `lr` is on AdamW's scale (torch rescales it per
    matrix); with `adjust_lr_fn=None` use Muon's original scale (about 0.02).

    `ns_dtype`: the dtype of the Newton-Schulz orthogonalisation. torch runs it in bf16, which
    CPUs without native bf16 (AVX2-only x86) run ~40x slower than fp32; "auto" keeps bf16
    where precision `auto` would pick it and computes in fp32 elsewhere (same iteration).
    `ns_steps`: Newton-Schulz iterations per update (torch's default 5); each costs three
    matrix products per matrix, which on small models is a large share of the step.
    """

    def __init__(self, params: ParamGroups, *, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.1,
                 adjust_lr_fn: str | None = "match_rms_adamw", adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 ns_dtype: Literal["auto", "bf16", "fp32"] = "auto",
                 expert_stacks: Literal["adamw", "muon"] = "adamw", batched: bool = False,
                 ns_steps: int = torch_muon.DEFAULT_NS_STEPS):
        _check_expert_stacks(expert_stacks)
        self.ns_dtype = ns_dtype
        self._auto_fp32: bool | None = None  # resolved on the first step, from the parameters' device
        split: dict[str, list[dict[str, Any]]] = {"muon": [], "stacked": [], "adamw": []}
        for group in params if not isinstance(params, torch.Tensor) else [params]:
            group = dict(group) if isinstance(group, dict) else {"params": [group]}
            for route, tensors in _route(list(group.pop("params")), group.get("kind", "matrix"),
                                         expert_stacks, batched).items():
                if tensors:
                    split[route].append({**group, "params": tensors, **({"lr": adamw_lr} if route == "adamw" else {})})
        if ns_steps < 1:
            raise ValueError(f"optimizer.ns_steps={ns_steps}: Newton-Schulz needs at least 1 iteration (torch uses 5)")
        muon_options = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "adjust_lr_fn": adjust_lr_fn,
                        "ns_steps": ns_steps}
        self._muon = torch.optim.Muon(split["muon"], **muon_options) if split["muon"] else None
        self._stacked = StackedMuon(split["stacked"], **muon_options) if split["stacked"] else None
        # tessera's adamw: torch's fused kernel where every tensor allows it, as the `adamw` entry
        self._adamw = adamw(split["adamw"], lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                            weight_decay=weight_decay) if split["adamw"] else None
        # each sub-optimizer present and its number of groups, in the order of `param_groups`
        self._subs = [(sub, len(groups)) for sub, groups in zip((self._muon, self._stacked, self._adamw),
                                                                split.values()) if sub is not None]
        super().__init__([p for groups in split.values() for g in groups for p in g["params"]], {})
        self.param_groups = [g for sub, _ in self._subs for g in sub.param_groups]
        self._share()

    @classmethod
    def state_tensors(cls, groups: ParamGroups, **settings: Any) -> dict[int, float]:
        """{id(parameter): state tensors of its size} (`tessera.components.optim.state_size`) under
        this optimizer's keyword `settings`: one (the momentum) for each matrix routed to Muon,
        two (AdamW's moments) for the rest."""
        expert_stacks = settings.get("expert_stacks", inspect.signature(cls).parameters["expert_stacks"].default)
        _check_expert_stacks(expert_stacks)
        out: dict[int, float] = {}
        for group in groups:
            for route, tensors in _route(list(group["params"]), group.get("kind", "matrix"), expert_stacks,
                                         batched=False).items():  # batched or not, Muon keeps one tensor
                out.update({id(p): ADAMW_STATE_TENSORS if route == "adamw" else 1.0 for p in tensors})
        return out

    def _share(self) -> None:
        """Point every sub-optimizer at this optimizer's state and at its slice of its groups."""
        start = 0
        for sub, count in self._subs:
            sub.state = self.state
            sub.param_groups = self.param_groups[start:start + count]
            start += count

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fp32 = self._ns_fp32()
        if self._stacked is not None:
            self._stacked.fp32 = fp32
        with self._orthogonalise_in(fp32):
            for sub, _ in self._subs:
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


def _check_expert_stacks(expert_stacks: str) -> None:
    if expert_stacks not in ("adamw", "muon"):
        raise ValueError(f"optimizer.expert_stacks={expert_stacks!r}: use 'adamw' or 'muon'")


def _route(tensors: list[torch.Tensor], kind: str, expert_stacks: str,
           batched: bool) -> dict[str, list[torch.Tensor]]:
    """Which sub-optimizer takes each tensor of a group of `kind`: 2-D hidden matrices Muon
    (StackedMuon when `batched`), 3-D expert stacks StackedMuon when `expert_stacks` is "muon",
    everything else AdamW."""
    hidden = kind == "matrix"
    matrices = [p for p in tensors if hidden and p.ndim == 2]
    muon = [] if batched else matrices
    stacked = ([] if not batched else matrices) + [
        p for p in tensors if hidden and p.ndim == 3 and expert_stacks == "muon"]
    chosen = {id(p) for p in muon + stacked}
    return {"muon": muon, "stacked": stacked, "adamw": [p for p in tensors if id(p) not in chosen]}


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
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # fused multiply-adds
    return (x.T if tall else x).to(grad.dtype)
