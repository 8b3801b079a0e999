"""Attention masks shared by the attention variants."""

from __future__ import annotations

import torch


def causal_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, T, T]: True where query i may attend key j.

    j <= i (causal) and both tokens belong to the same document (`doc_ids`: [B, T]).
    """
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]
