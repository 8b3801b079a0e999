"""Parameter and FLOP counts of a model, computable on the meta device (no weights needed)."""

from __future__ import annotations

from torch import nn

from components.interfaces import Attention


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding/head counts once)."""
    return sum(p.numel() for p in model.parameters())


def embedding_parameters(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention scores.

    Matmul weights are those of every `nn.Linear` (the output head included, the input
    embedding lookup excluded); attention adds 3x its forward score FLOPs at `seq_len`.
    """
    seen: set[int] = set()
    matmul = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul += module.weight.numel()
    attention = sum(m.score_flops_per_token(seq_len) for m in model.modules() if isinstance(m, Attention))
    return 6.0 * matmul + 3.0 * attention
