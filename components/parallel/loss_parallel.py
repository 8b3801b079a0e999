"""Cross-entropy of vocab-sharded logits, for a tensor-parallel output head.

A primitive the decoder's loss calls when its head's logits arrive as a vocab-sharded DTensor,
so it sits below the blocks, beside the tensor-parallel layouts (`tp_styles`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel


def vocab_parallel_cross_entropy(logits: DTensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits [B, T, V] (a DTensor, `Shard(-1)` on the tp
    mesh) against plain targets [B, T], as a plain scalar tensor equal on every rank.

    torch's `loss_parallel` computes it from the shards (a max, a sum of exponentials and the
    target logit, each all-reduced over the ranks). Its backward must run under the same
    context, but a trainer calls `backward` far from here (gradient accumulation, loss
    scaling, evaluation without any), so the forward and the backward each enter it here."""
    return _LossParallel.apply(logits, targets)


class _LossParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: DTensor, targets: torch.Tensor) -> torch.Tensor:
        leaf = logits.detach().requires_grad_(logits.requires_grad)
        with torch.enable_grad(), torch_loss_parallel():
            loss = F.cross_entropy(leaf.float().flatten(0, 1), targets.flatten())
        ctx.graph = (leaf, loss)
        return loss.detach().to_local().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        leaf, loss = ctx.graph
        ctx.graph = None
        upstream = DTensor.from_local(grad, loss.device_mesh, loss.placements, run_check=False)
        with torch_loss_parallel():
            (grad_logits,) = torch.autograd.grad(loss, leaf, upstream)
        return grad_logits, None
