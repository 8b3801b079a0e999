"""Perplexity of a text under a model: the mean next-token loss over overlapping windows.

A text longer than the model's context is scored in windows of `seq_len` tokens that advance
by `stride`; each window scores only the tokens the previous windows did not, so every token
is predicted once, from up to `seq_len - stride` tokens of context before its window's new
part (a smaller stride: more context per token, more compute).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True, kw_only=True)
class Perplexity:
    """What `perplexity` measured: `nats` summed over `tokens` predicted tokens of a text of
    `bytes` UTF-8 bytes."""

    nats: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy, nats per token."""
        return self.nats / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Total bits over the text's bytes: comparable across tokenizers."""
        return self.nats / math.log(2) / max(1, self.bytes)


def windows(n_tokens: int, *, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over `n_tokens` tokens: the window reads
    tokens[start:end] (at most seq_len + 1 of them: inputs and the shifted targets) and scores
    the targets at positions >= first_scored. Every position 1..n_tokens-1 is scored once."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    spans, scored = [], 1  # position 0 has no context to be predicted from
    while scored < n_tokens:
        end = min(n_tokens, scored + stride)
        start = max(0, end - seq_len - 1)
        spans.append((start, end, scored))
        scored = end
    return spans


@torch.no_grad()
def perplexity(model: nn.Module, tokens: list[int], *, text_bytes: int, seq_len: int, stride: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu") -> Perplexity:
    """Score `tokens` (the text's ids, usually after a document-start token) with `model`
    (a callable tokens [B, T] -> logits [B, T, V], put in eval mode here) in windows of at most
    `seq_len` inputs advancing by `stride` (default seq_len // 2). Windows go through the model
    `batch_size` at a time; the shorter last one is scored alone."""
    stride = stride or max(1, seq_len // 2)
    model.eval()
    ids = torch.tensor(tokens, dtype=torch.long)
    spans = windows(len(tokens), seq_len=seq_len, stride=stride)
    nats, count = 0.0, 0
    full = [s for s in spans if s[1] - s[0] == seq_len + 1]
    short = [s for s in spans if s[1] - s[0] != seq_len + 1]
    for group in [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in short]:
        window = torch.stack([ids[start:end] for start, end, _ in group]).to(device)
        logits = model(window[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="none").view(len(group), -1)
        for row, (start, _, first) in enumerate(group):
            kept = loss[row, first - start - 1:]  # targets at positions >= first
            nats += float(kept.sum())
            count += kept.numel()
    return Perplexity(nats=nats, tokens=count, bytes=text_bytes)
