"""Greedy speculative decoding with the model's own multi-token prediction module as the drafter.

DeepSeek-V3 (arXiv:2412.19437 §5.4.3) notes that its MTP module, kept at inference, drafts the
token after next; the main model checks the draft in the same forward that gives the next
token. Each verification forward feeds [x_n, draft] at positions n, n+1:

- its logits at n give the true x_{n+1}; if that equals the draft, the logits at n+1 (computed
  from the right prefix) give x_{n+2} too: two tokens for one forward;
- otherwise x_{n+1} alone is kept and the caches forget slot n+1.

The MTP module then drafts from the new hidden states over its own cache (its block's
attention runs over positions too): at position i it reads h_i and the embedding of x_{i+1}
and predicts x_{i+2}. Only the argmax of the main model is ever kept, so the output equals
greedy `generate` token for token (up to rounding in near-ties).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tessera.components.generate.request import RowOutputs, check_request
from tessera.components.generate.steps import inference, model_place
from tessera.components.interfaces import AttentionCache
from tessera.components.model.decoder import DecoderLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculativeStats:
    """What speculation bought: `drafted` drafts checked by the main model, `accepted` of them
    right, `forwards` main-model forwards (prefills included) for `tokens` new tokens."""

    drafted: int
    accepted: int
    forwards: int
    tokens: int

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward: 1.0 for plain greedy decoding, up to 2.0 here."""
        return self.tokens / self.forwards if self.forwards else 0.0


@dataclasses.dataclass
class _Counts:
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0


def speculative_generate(model: DecoderLM, prompts: list[list[int]], *, max_new_tokens: int,
                         eos_id: int | None = None,
                         on_token: Callable[[int, int], bool | None] | None = None,
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """Greedy continuations of `prompts` (as `generate(..., temperature=0)`, same stopping
    rules) drafted by the model's first MTP module, and the speculation's statistics.
    Rows are decoded one after another (each accepts drafts at its own pace)."""
    check_request(model, prompts, max_new_tokens=max_new_tokens)
    if not len(model.mtp):
        raise ValueError("speculative_generate drafts with the model's multi-token prediction module, and this "
                         "model has none: build it with mtp (e.g. mtp_depth=1) or use generate")
    outputs = RowOutputs(len(prompts), max_new_tokens=max_new_tokens, eos_id=eos_id, on_token=on_token)
    counts = _Counts()
    with inference(model):
        for row, prompt in enumerate(prompts):
            if not outputs.done[row]:
                _decode_row(model, prompt, row, outputs, counts, max_new_tokens)
    stats = SpeculativeStats(drafted=counts.drafted, accepted=counts.accepted, forwards=counts.forwards,
                             tokens=sum(len(t) for t in outputs.tokens))
    return outputs.tokens, stats


class _Drafter:
    """The first MTP module over its own cache: `draft(hidden [1, T, D], ahead [1, T] tokens,
    positions [1, T])` extends its cache and returns its guess for the token after the last."""

    def __init__(self, model: DecoderLM, cache: AttentionCache):
        self.model, self.module, self.cache = model, model.mtp[0], cache

    def draft(self, hidden: torch.Tensor, ahead: torch.Tensor, positions: torch.Tensor) -> int:
        out = self.module.forward_cached(hidden, self.model.embedding(ahead), cache=self.cache, positions=positions)
        return int(self.model.head(self.module.head_norm(out[:, -1])).argmax(-1))


def _decode_row(model: DecoderLM, prompt: list[int], row: int, outputs: RowOutputs, counts: _Counts,
                max_new_tokens: int) -> None:
    device, dtype = model_place(model)
    n = len(prompt)
    room = n + max_new_tokens + 1  # a verification writes one slot past the last kept token
    caches = model.new_caches(batch=1, max_len=room, device=device, dtype=dtype)
    drafter = _Drafter(model, model.new_mtp_caches(batch=1, max_len=room, device=device, dtype=dtype)[0])
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(n, device=device)[None]
    hidden = model.hidden_cached(tokens, caches=caches, positions=positions)
    counts.forwards += 1
    current = int(model.head(hidden[:, -1]).argmax(-1))
    if outputs.emit(row, current):
        return
    ahead = torch.cat((tokens[:, 1:], torch.tensor([[current]], device=device)), dim=1)
    draft = drafter.draft(hidden, ahead, positions)
    while True:  # `current` sits at position n, not yet seen by the main model
        positions = torch.tensor([[n, n + 1]], device=device)
        hidden = model.hidden_cached(torch.tensor([[current, draft]], device=device), caches=caches,
                                     positions=positions)
        counts.forwards += 1
        counts.drafted += 1
        checked = model.head(hidden).argmax(-1)[0].tolist()                # true x_{n+1}, x_{n+2} if draft right
        if checked[0] == draft:
            counts.accepted += 1
            if outputs.emit(row, draft) or outputs.emit(row, checked[1]):
                return
            draft = drafter.draft(hidden, torch.tensor([[draft, checked[1]]], device=device), positions)
            current, n = checked[1], n + 2
        else:
            for cache in caches:
                cache.truncate(n + 1)  # forget the wrong draft's slot
            if outputs.emit(row, checked[0]):
                return
            draft = drafter.draft(hidden[:, :1], torch.tensor([[checked[0]]], device=device), positions[:, :1])
            current, n = checked[0], n + 1
