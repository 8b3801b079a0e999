"""Two ways to get each row's next-token logits while decoding: over caches, or by recomputing.

Both answer `start()` with the logits after the prompts and `advance(tokens)` with the logits
after appending one token per row, [B, V] each, so the decode loop does not care which runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tessera.components.generate.request import left_padded
from tessera.components.model.decoder import DecoderLM


@contextmanager
def inference(model: DecoderLM) -> Iterator[None]:
    """Eval mode (no dropout, no balance bookkeeping) and no autograd, restoring the mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_place(model: DecoderLM) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's weights (what its caches are made in)."""
    weight = model.embedding.weight
    return weight.device, weight.dtype


class CachedSteps:
    """The prompts prefilled in one forward as a left-padded batch, then one token per row per
    step over the layers' caches. Rows move in lockstep; each keeps its own positions."""

    def __init__(self, model: DecoderLM, prompts: list[list[int]], *, max_new_tokens: int):
        device, dtype = model_place(model)
        self.model = model
        self.tokens, self.positions = left_padded(prompts, device)
        self.caches = model.new_caches(batch=len(prompts), max_len=self.tokens.shape[1] + max_new_tokens,
                                       device=device, dtype=dtype)

    def start(self) -> torch.Tensor:
        hidden = self.model.hidden_cached(self.tokens, caches=self.caches, positions=self.positions)
        self.positions = self.positions[:, -1:]
        return self.model.head(hidden[:, -1])

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions + 1
        hidden = self.model.hidden_cached(tokens[:, None], caches=self.caches, positions=self.positions)
        return self.model.head(hidden[:, -1])


class RecomputedSteps:
    """The reference: every step runs the plain (training) forward over each row's whole
    sequence, alone, with no cache and no padding."""

    def __init__(self, model: DecoderLM, prompts: list[list[int]]):
        self.model = model
        self.device = model_place(model)[0]
        self.sequences = [list(p) for p in prompts]

    def _logits(self) -> torch.Tensor:
        rows = [self.model(torch.tensor([seq], device=self.device))[0, -1] for seq in self.sequences]
        return torch.stack(rows)

    def start(self) -> torch.Tensor:
        return self._logits()

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        for seq, token in zip(self.sequences, tokens.tolist(), strict=True):
            seq.append(token)
        return self._logits()
