"""Attention masks shared by the attention variants."""

from __future__ import annotations

from collections.abc import Callable

import torch


def causal_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, T, T]: True where query i may attend key j.

    j <= i (causal) and both tokens belong to the same document (`doc_ids`: [B, T]).
    """
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor,
                  rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] for cached decoding, from positions instead of slot indices.

    q_pos: [B, T] positions of the new tokens; k_pos: [B, S] positions of the keys they may
    read (-1: an empty or padding slot, never attended). `rule(q [B, T, 1], k [B, 1, S])` is
    the attention's own condition (causal, a window, a block layout). A padding query (-1)
    may read every key, so its softmax has something finite to normalise; nothing reads it.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k >= 0) & rule(q, k)
    return (allowed | (q < 0))[:, None]
