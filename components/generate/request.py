"""Checking a generation request and laying prompts out as one left-padded batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tessera.components.model.decoder import DecoderLM


def check_request(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise ValueError (TypeError for a wrong model) naming what is wrong with the request."""
    if not isinstance(model, DecoderLM) or model.embedding is None or model.head is None:
        raise TypeError(f"generate needs a whole tessera DecoderLM (embedding and head), got {type(model).__name__}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists, e.g. [[1, 2, 3]]")
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt {row} is empty or not a list of token ids: every row needs at least one token")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(f"prompt {row} holds token ids outside [0, {model.vocab_size}): {bad[:5]} "
                             f"(tokenize with the model's own tokenizer)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    table = getattr(model.position, "max_len", None)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if table is not None and longest > table:
        raise ValueError(f"a prompt of {longest - max_new_tokens} tokens plus max_new_tokens={max_new_tokens} "
                         f"passes the model's learned position table (max_len={table}): shorten one of them")


def left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, P] (padding id 0 on the left, P the longest prompt) and positions [B, P]:
    0.. along each row's own tokens, -1 on its padding."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt)
        positions[row, width - len(prompt):] = torch.arange(len(prompt))
    return tokens.to(device), positions.to(device)


class RowOutputs:
    """The tokens each row has produced and whether it has stopped: at `eos_id` (not kept),
    after `max_new_tokens`, or when `on_token(row, token)` returns True (that token kept)."""

    def __init__(self, n_rows: int, *, max_new_tokens: int, eos_id: int | None,
                 on_token: Callable[[int, int], bool | None] | None):
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.done = [max_new_tokens == 0] * n_rows
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        self.on_token = on_token

    def emit(self, row: int, token: int) -> bool:
        """Record `token` for `row` unless it has stopped; return whether it has stopped now."""
        if self.done[row]:
            return True
        if token == self.eos_id:
            self.done[row] = True
            return True
        self.tokens[row].append(token)
        stop = self.on_token(row, token) if self.on_token is not None else None
        self.done[row] = bool(stop) or len(self.tokens[row]) >= self.max_new_tokens
        return self.done[row]

    @property
    def all_done(self) -> bool:
        return all(self.done)
