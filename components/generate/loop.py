"""The decode loop: prefill, then sample one token per row per step until every row stops."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tessera.components.generate.request import RowOutputs, check_request
from tessera.components.generate.sampling import choose_next
from tessera.components.generate.steps import CachedSteps, RecomputedSteps, inference
from tessera.components.model.decoder import DecoderLM


def generate(model: DecoderLM, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_token: Callable[[int, int], bool | None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) and return each one's new tokens.

    A row stops at `eos_id` (not included), after `max_new_tokens`, or when
    `on_token(row, token)`, called with every kept token as it is chosen, returns True (that
    token included). temperature 0 is greedy; otherwise tokens are drawn from
    softmax(logits / temperature), restricted to the `top_k` best and then to the `top_p`
    nucleus, with `generator` (on the model's device) for reproducible draws.

    Prompts of different lengths run as one batch, left-padded, each row at its own positions,
    so a row's tokens are those it would get alone. `use_cache=True` prefills the prompts in one
    forward and then runs one token per step over each layer's cache (KV, MLA latent, sliding
    ring or linear state); `use_cache=False` recomputes every row's whole sequence each step
    (the reference). Runs under no_grad in eval mode (the mode is restored) on the model's device
    and dtype.
    """
    check_request(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    outputs = RowOutputs(len(prompts), max_new_tokens=max_new_tokens, eos_id=eos_id, on_token=on_token)
    if max_new_tokens == 0:
        return outputs.tokens
    with inference(model):
        steps = CachedSteps(model, prompts, max_new_tokens=max_new_tokens) if use_cache \
            else RecomputedSteps(model, prompts)
        logits = steps.start()
        for _ in range(max_new_tokens):
            tokens = choose_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            for row, token in enumerate(tokens.tolist()):
                outputs.emit(row, token)
            if outputs.all_done:
                break
            logits = steps.advance(tokens)
    return outputs.tokens
