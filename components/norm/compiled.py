"""torch.compile'd norm kernels: the opt-in fast path of `RMSNorm` / `LayerNorm`.

benchmarks/norms.py measured (forward+backward, [8, 1024, 2048], 1 CPU thread): compiled
RMSNorm 2.9x (fp32) and 5x (bf16) faster than eager / `F.rms_norm`, which is not fused on CPU;
compiled LayerNorm 2.2x faster in bf16 but 1.25x slower than `F.layer_norm` in fp32. The
first call compiles (tens of seconds), so it is off by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CACHE: dict[str, Callable[..., torch.Tensor]] = {}


def rms_norm_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def layer_norm_formula(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    return (out + bias.float() if bias is not None else out).to(x.dtype)


def compiled(name: str) -> Callable[..., torch.Tensor]:
    """The compiled kernel `name` ("rms_norm" or "layer_norm"), built once per process."""
    if name not in _CACHE:
        formula = {"rms_norm": rms_norm_formula, "layer_norm": layer_norm_formula}[name]
        _CACHE[name] = torch.compile(formula, dynamic=True)
    return _CACHE[name]
