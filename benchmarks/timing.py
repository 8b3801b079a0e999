"""Shared measurement helpers of the benchmarks: one training step's time, and the HF loss."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def training_step_seconds(model, loss_fn, tokens: torch.Tensor, dtype: torch.dtype | None, steps: int,
                          warmup: int = 1, wrap_optimizer=lambda opt: opt) -> float:
    """Best time of `steps` full training steps (forward, backward, AdamW) after `warmup` ones,
    under CPU autocast to `dtype` (None: no autocast). `wrap_optimizer`: e.g. a precision
    policy's, so that its optimizer-side work is timed too."""
    opt = wrap_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else nullcontext
    best = float("inf")
    for i in range(steps + warmup):
        start = time.perf_counter()
        with ctx():
            loss = loss_fn(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            best = min(best, time.perf_counter() - start)
    return best


def hf_causal_lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a transformers causal LM on tokens [B, T + 1]."""
    return F.cross_entropy(model(tokens[:, :-1]).logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def tessera_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Our model's LM loss on tokens [B, T + 1]."""
    return model.losses(tokens[:, :-1], tokens[:, 1:])["lm"]
