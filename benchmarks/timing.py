"""Shared measurement helpers of the benchmarks: training-step closures, interleaved median
timing, the HF loss, and which precisions this machine runs fast.

Timings on shared machines swing by +-20% over seconds, so contenders are never timed one
after the other: every repeat times one step of each in turn, and each reports its median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from tessera.components.precision import auto
from tessera.components.train import cpu_memory

Step = Callable[[], None]


def training_step(model, loss_fn, tokens: torch.Tensor, dtype: torch.dtype | None,
                  wrap_optimizer=lambda opt: opt) -> Step:
    """One full training step (forward, backward, AdamW, zero_grad) of `model` on `tokens`,
    under CPU autocast to `dtype` (None: no autocast). AdamW is torch's fused kernel, the
    default of both tessera's `adamw` and transformers' Trainer (`adamw_torch_fused`).
    `wrap_optimizer`: e.g. a precision policy's, so that its optimizer-side work is timed too."""
    opt = wrap_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True))
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else nullcontext

    def step() -> None:
        with ctx():
            loss = loss_fn(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved_medians(steps: dict[str, Step], *, repeats: int, warmup: int = 2,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each of `steps`, timed round-robin `repeats` times after
    `warmup` untimed rounds (compilation happens there). `clock`: wall time by default;
    `time.thread_time` on a shared machine, where other processes deschedule us at random
    (wall time counts that, this thread's CPU time does not)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fast_precisions(device: str = "cpu") -> tuple[list[tuple[str, torch.dtype | None]], list[str]]:
    """The (label, autocast dtype) rows worth timing here, and a printed reason for each one
    skipped: bf16 only where `auto` would pick it (native bf16, confirmed by the probe)."""
    rows: list[tuple[str, torch.dtype | None]] = [("fp32", None)]
    policy, why = auto.choose(device)
    if policy.compute_dtype == torch.bfloat16:
        rows.insert(0, ("bf16 autocast", torch.bfloat16))
        return rows, []
    return rows, [f"bf16 rows skipped: {why}"]


def allocate_as_a_run() -> str:
    """Set this process's host allocator as every tessera run sets it (`Compute.keep_freed_memory`,
    on by default: glibc keeps freed blocks for the next step) and say so in a printable line.

    Without it, buffers above glibc's current mmap threshold (128 KiB at first, raised only by
    the largest block freed so far) are mapped and faulted in afresh on every use, a cost no
    run pays: the debug MoE layer took 31 ms a step without the setting and 25 ms with it (AVX2
    Zen 3, fp32), its dense peer 19.5 ms either way. Both contenders of a table run in this one
    process, so they share the setting."""
    if cpu_memory.keep_freed_memory():
        return "host allocator: freed memory kept for the next step, as in a tessera run (compute.keep_freed_memory)"
    return "host allocator: left as it is (the environment sets glibc's thresholds, or this is not glibc on Linux)"


def hf_causal_lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a transformers causal LM on tokens [B, T + 1]."""
    return F.cross_entropy(model(tokens[:, :-1]).logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def tessera_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Our model's LM loss on tokens [B, T + 1]."""
    return model.losses(tokens[:, :-1], tokens[:, 1:])["lm"]
