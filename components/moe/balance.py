"""MoE load-balance losses of DeepSeekMoE, DeepSeek-V2 and DeepSeek-V3 (reference §4c).

All take per-sequence statistics, so T below is the tokens of one sequence, and return the
mean over the batch's sequences (V3's complementary loss is sequence-wise by definition;
DeepSeekMoE/V2 write T for "the tokens" and are computed the same way here).
"""

from __future__ import annotations

import torch


def expert_fractions(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f_i = N/(K T) * (tokens of the sequence routed to expert i): [B, E], no gradient.

    indices: [B, T, K] selected experts.
    """
    b, t, k = indices.shape
    counts = torch.zeros(b, n_experts, device=indices.device).scatter_add_(
        1, indices.reshape(b, -1), torch.ones(b, t * k, device=indices.device))
    return counts * n_experts / (k * t)


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i averaged over sequences; P_i = mean_t s'_{i,t}, s' = scores renormalised over experts.

    scores: [B, T, E] affinities (softmax: already normalised; V3's sigmoid: normalised here,
    the paper's s'); indices: [B, T, K]. With softmax scores this is DeepSeekMoE/V2's
    expert-level loss, with sigmoid scores V3's complementary sequence-wise loss.
    """
    probs = scores / scores.sum(-1, keepdim=True)
    f = expert_fractions(indices, scores.shape[-1])
    return (f * probs.mean(1)).sum(-1).mean()


def device_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_devices: int) -> torch.Tensor:
    """DeepSeekMoE/V2 device-level loss: sum_d f'_d P'_d with experts split into `n_devices`
    equal contiguous groups; f'_d = mean of f over the group, P'_d = sum of P over the group."""
    b, _, e = scores.shape
    probs = scores / scores.sum(-1, keepdim=True)
    f = expert_fractions(indices, e).view(b, n_devices, e // n_devices).mean(-1)
    p = probs.mean(1).view(b, n_devices, e // n_devices).sum(-1)
    return (f * p).sum(-1).mean()
