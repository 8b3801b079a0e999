"""Muon on stacked expert weights: each expert's matrix orthogonalised on its own."""

from __future__ import annotations

from typing import Any

import torch
import torch.optim._muon as torch_muon


class StackedMuon(torch.optim.Optimizer):
    """Muon for 3-D parameters [n_experts, rows, cols], as if each expert's [rows, cols] matrix
    were its own Muon parameter (Moonlight, arXiv:2502.16982, trains MoE experts with Muon per
    matrix): the same Nesterov momentum, quintic Newton-Schulz iteration, decoupled weight decay
    and per-matrix learning-rate adjustment as torch.optim.Muon, applied slice by slice. Kept
    separate because torch.optim.Muon refuses anything but 2-D tensors.

    The Newton-Schulz function is looked up on torch's module at call time, so the fp32 swap of
    `MuonWithAdamW` reaches it too."""

    def __init__(self, params: list[dict[str, Any]], *, lr: float, weight_decay: float, momentum: float,
                 adjust_lr_fn: str | None, nesterov: bool = True, ns_steps: int = torch_muon.DEFAULT_NS_STEPS,
                 eps: float = 1e-7):
        for group in params:
            for p in group["params"]:
                if p.ndim != 3:
                    raise ValueError(f"StackedMuon takes 3-D expert stacks; got a parameter of shape {tuple(p.shape)}")
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
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """One Muon step of every expert matrix in `p` [n_experts, rows, cols]."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - momentum)
        update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
        orthogonal = torch.stack([
            torch_muon._zeropower_via_newtonschulz(matrix, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for matrix in update.unbind(0)])
        lr = float(group["lr"])
        adjusted = torch_muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape[1:])
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(orthogonal.to(p.dtype), alpha=-adjusted)
