"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [B, V] with every entry below each row's k-th largest set to -inf (ties with the
    k-th value are kept, so the choice never depends on how a sort breaks ties)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_nucleus(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits [B, V] restricted to each row's nucleus (Holtzman et al., arXiv:1904.09751 §3.1):
    the most likely tokens, in order, until their probability reaches p. A token is kept when
    the probability of the tokens ranked strictly before it is below p, so the top token is
    always kept; everything else becomes -inf."""
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.float().softmax(-1)
    before = probs.cumsum(-1) - probs
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row, [B] int64, from logits [B, V].

    temperature 0: the argmax (greedy; top_k/top_p change nothing). Otherwise one draw from
    softmax(logits / temperature) after the top-k and then the top-p filter, using `generator`
    (drawn on its device) so a seeded generator reproduces the draw.
    """
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k is not None:
        scaled = keep_top_k(scaled, top_k)
    if top_p is not None and top_p < 1:  # p = 1 keeps everything (cumsum rounding could drop a tail)
        scaled = keep_nucleus(scaled, top_p)
    probs = scaled.softmax(-1)
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator for a GPU model
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
