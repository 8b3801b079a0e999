"""What a diverging run reports: gradient clipping that remembers which gradient went
non-finite first, and the message of `TrainingDiverged` (step, what went bad, what to try)."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def clip_gradients(named_params: list[tuple[str, torch.nn.Parameter]], max_norm: float | None, *,
                   sum_over: torch.distributed.ProcessGroup | None = None) -> tuple[torch.Tensor, str | None]:
    """Scale the gradients so their global L2 norm is at most `max_norm` (None: no clipping).

    Returns (the norm before clipping, the name of the first parameter whose gradient is
    non-finite, or None). The name is looked up only when the norm is non-finite, and before
    clipping, which would turn every gradient into NaN. Under a sharded plan each process
    names the first non-finite gradient of its own shards; the norm is the global one.
    `sum_over`: a group whose processes hold disjoint parameters (pipeline stages): their
    squared norms are summed.
    """
    # One norm per device mesh (FSDP's, the experts' ep mesh, plain tensors), reduced to its
    # global value, then their root sum of squares: torch cannot stack DTensors of two meshes.
    by_mesh: dict[object, list[torch.nn.Parameter]] = {}
    for _, p in named_params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        total = norms[0]
    else:  # several meshes (or no gradient at all: zero)
        total = torch.stack(norms).square().sum().sqrt() if norms else torch.zeros(())
    if sum_over is not None:
        squared = total.detach().double().square().reshape(1)
        torch.distributed.all_reduce(squared, group=sum_over)
        total = squared.sqrt().to(total.dtype).reshape(())
    first_bad = None
    if not math.isfinite(total.item()):
        first_bad = next((name for name, p in named_params
                          if p.grad is not None and not torch.isfinite(_local(p.grad)).all()), None)
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm is not None else math.inf, total)
    return total, first_bad


@torch.no_grad()
def first_nonfinite_weight(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or infinity (None when all are finite)."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(_local(p)).all()), None)


def divergence_message(*, step: int, reason: str, terms: dict[str, float], first_bad_grad: str | None,
                       first_bad_weight: str | None, stopped_because: str, lr: float, warmup_steps: int | None,
                       grad_clip: float | None, compute_dtype: torch.dtype) -> str:
    """The `TrainingDiverged` message: where (`step` counted from 1, as the progress lines do),
    what went non-finite, and config changes to try (`lr`: the configured peak learning rate)."""
    parts = [f"training diverged at step {step}: {reason}"]
    if len(terms) > 1:
        parts.append("the loss is the sum of " + ", ".join(f"{name} {value:.4g}" for name, value in terms.items()))
    if first_bad_grad is not None:
        parts.append(f"first non-finite gradient: {first_bad_grad}")
    parts.append(f"first non-finite weight: {first_bad_weight}" if first_bad_weight is not None
                 else "the weights themselves are still finite")
    parts.append(stopped_because)
    tries = [f"a lower learning rate, e.g. optimizer.lr={lr / 10:.3g} (now {lr:.3g})"]
    if warmup_steps is not None:
        tries.append(f"a longer warmup, e.g. scheduler.warmup_steps={max(2 * warmup_steps, 100)} "
                     f"(now {warmup_steps})")
    else:
        tries.append("a schedule with a warmup (scheduler=@warmup_cosine(...))")
    tries.append("gradient clipping, step.grad_clip=1.0 (now off)" if grad_clip is None
                 else f"tighter gradient clipping, e.g. step.grad_clip={grad_clip / 2:g} (now {grad_clip:g})")
    if compute_dtype != torch.float32:
        tries.append(f"precision=@fp32, to rule out {str(compute_dtype).removeprefix('torch.')} overflow")
    return "; ".join(parts) + ". Try " + "; or ".join(tries) + "."
