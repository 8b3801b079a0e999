"""Muon on stacked expert weights: each expert's matrix orthogonalised on its own."""

from __future__ import annotations

from typing import Any

import torch
import torch.optim._muon as torch_muon


class StackedMuon(torch.optim.Optimizer):
    """Muon for 2-D matrices and 3-D expert stacks [n_experts, rows, cols], each matrix (each
    expert's [rows, cols] slice) updated as its own Muon parameter (Moonlight, arXiv:2502.16982,
    trains MoE experts with Muon per matrix): the same Nesterov momentum, quintic Newton-Schulz
    iteration, decoupled weight decay and per-matrix learning-rate adjustment as
    torch.optim.Muon. Kept separate because torch.optim.Muon refuses anything but 2-D tensors,
    and because it orthogonalises one matrix per call: here every matrix of one shape in a
    group goes through one batched iteration (on 2 CPU cores the ~40 per-matrix calls of the
    debug model cost more than the arithmetic).

    The iteration runs in bf16 as torch's does, or in fp32 when `fp32` is set (`MuonWithAdamW`
    sets it as it does for torch's Muon)."""

    fp32: bool = False

    def __init__(self, params: list[dict[str, Any]], *, lr: float, weight_decay: float, momentum: float,
                 adjust_lr_fn: str | None, nesterov: bool = True, ns_steps: int = torch_muon.DEFAULT_NS_STEPS,
                 eps: float = 1e-7):
        for group in params:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"StackedMuon takes matrices and 3-D expert stacks; got shape {tuple(p.shape)}")
        coefficients = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                                  "adjust_lr_fn": adjust_lr_fn, "ns_steps": ns_steps, "eps": eps,
                                  "ns_coefficients": coefficients})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = self._momentum(params, group)
            # one batch per matrix shape (a tall matrix as its transpose: the iteration runs on the
            # wide side anyway) and device mesh: DTensors on different meshes (expert stacks
            # sharded over ep, the other matrices over dp) cannot be concatenated
            batches: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p, update in zip(params, updates):
                update = update if update.ndim == 3 else update[None]
                update = update.mT if update.size(1) > update.size(2) else update
                key = (*update.shape[-2:], id(getattr(p, "device_mesh", None)))
                batches.setdefault(key, []).append((p, update))
            for pairs in batches.values():
                self._apply(pairs, group)
        return loss

    def _momentum(self, params: list[torch.Tensor], group: dict[str, Any]) -> list[torch.Tensor]:
        """Advance the parameters' momentum buffers; the (Nesterov) updates to orthogonalise.
        One foreach call per operation for the whole group (the debug model has ~150 matrices;
        a call per matrix cost more than the arithmetic)."""
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        momentum = group["momentum"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)
        return torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers

    def _apply(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
               group: dict[str, Any]) -> None:
        """Orthogonalise the (wide-side) updates of `pairs`, all of one shape, in one batch; step
        their parameters."""
        updates = torch.cat([update for _, update in pairs])
        orthogonal = newton_schulz_batched(updates, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                           dtype=torch.float32 if self.fp32 else torch.bfloat16)
        lr = float(group["lr"])
        params = [p for p, _ in pairs]
        parts = [(part if part.shape[-2:] == p.shape[-2:] else part.mT).reshape(p.shape).to(p.dtype)
                 for p, part in zip(params, orthogonal.split([u.size(0) for _, u in pairs]))]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        # the rate follows each matrix's own orientation ("original" scales tall matrices only)
        rates = [torch_muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape[-2:]) for p in params]
        for rate in set(rates):
            chosen = [i for i, r in enumerate(rates) if r == rate]
            torch._foreach_add_([params[i] for i in chosen], [parts[i] for i in chosen], alpha=-rate)


def newton_schulz_batched(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float, *, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation of each matrix of `grad`
    [n, rows, cols] at once (batched matmuls: one call per iteration, not one per expert),
    computed in `dtype`: X <- G / ||G|| per matrix (on the wide orientation), then `ns_steps`
    times X <- a X + (b A + c A^2) X with A = X X^T. Returns [n, rows, cols] in `dtype`."""
    a, b, c = ns_coefficients
    tall = grad.size(1) > grad.size(2)
    x = grad.to(dtype)
    x = x.mT if tall else x
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        # a X + (b A + c A^2) X as two fused multiply-adds: no separate scale and add passes over X
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
