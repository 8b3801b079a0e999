"""Hyperparameter rules: the source article's lr ∝ sqrt(batch) and DeepSeek LLM's fitted laws."""

from __future__ import annotations


def sqrt_batch_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Learning rate for `batch` when `base_lr` suited `base_batch`: lr scales with sqrt(batch)."""
    return base_lr * (batch / base_batch) ** 0.5


def deepseek_llm_compute(n_layers: int, d_model: int, seq_len: int, tokens: float) -> float:
    """C = M * D with M = 72 n_layer d^2 + 12 n_layer d l_seq non-embedding FLOPs per token (DeepSeek LLM Eq. 2)."""
    return (72 * n_layers * d_model**2 + 12 * n_layers * d_model * seq_len) * tokens


def deepseek_llm_optimal_lr(compute: float) -> float:
    """eta_opt = 0.3118 * C^-0.1250 (DeepSeek LLM §3.1, fitted for C in 1e17..2e19 FLOPs)."""
    return 0.3118 * compute**-0.1250


def deepseek_llm_optimal_batch_tokens(compute: float) -> float:
    """B_opt = 0.2920 * C^0.3271 tokens per step (DeepSeek LLM §3.1)."""
    return 0.2920 * compute**0.3271
