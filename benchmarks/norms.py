"""Which RMSNorm / LayerNorm implementation is fastest here: decides the shipped fast path.

    python benchmarks/norms.py [--compile]

Compares, forward+backward on [8, 1024, 2048] activations, one thread:
- "eager ops": the textbook formula in separate tensor ops;
- "default": `F.rms_norm` / `F.layer_norm` — what the
  library's `RMSNorm` and `LayerNorm` run;
- "compiled": the modules with `compiled=True` (with `--compile`; compiling takes a while).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tessera.components.norm.layernorm import LayerNorm  # noqa: E402
from tessera.components.norm.rmsnorm import RMSNorm  # noqa: E402


def rms_eager(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w.to(x.dtype)


def ln_eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps) * w + b).to(x.dtype)


def timeit(fn, x: torch.Tensor, repeats: int = 5) -> float:
    best = float("inf")
    for i in range(repeats + 1):
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        fn(xi).float().sum().backward()
        if i:  # first call warms up (and compiles)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the textbook formula")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="norm forward+backward, [8, 1024, 2048], 1 thread (ms; lower is better)")
    for col in ("norm", "dtype", "eager ops", "default (F.rms_norm / F.layer_norm)", "compiled"):
        table.add_column(col, justify="right")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 1024, 2048, dtype=dtype)
        rms = RMSNorm(dim=2048)
        ln = LayerNorm(dim=2048)
        cases = {
            "RMSNorm": (lambda t, rms=rms: rms_eager(t, rms.weight), rms, RMSNorm(dim=2048, compiled=True)),
            "LayerNorm": (lambda t, ln=ln: ln_eager(t, ln.weight, ln.bias), ln, LayerNorm(dim=2048, compiled=True)),
        }
        for name, (eager, module, fast) in cases.items():
            compiled = f"{timeit(fast, x) * 1e3:.1f}" if args.compile else "-"
            table.add_row(name, str(dtype).removeprefix("torch."), f"{timeit(eager, x) * 1e3:.1f}",
                          f"{timeit(module, x) * 1e3:.1f}", compiled)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
