"""Log-likelihood scoring of token continuations: the one computation behind multiple-choice
accuracy (in the training loop and through lm-evaluation-harness) and rolling perplexity.

A request is `(context, continuation)`, both token id lists; its score is the sum over the
continuation's tokens of log p(token | everything before it), and whether greedy decoding
(the argmax at every position) would have produced the continuation. A request longer than
`max_length + 1` tokens loses tokens from the left of its context, never from the
continuation (a continuation longer than `max_length` is an error).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from tessera.components.interfaces import PrecisionPolicy

Request = tuple[list[int], list[int]]


def _window(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], int]:
    """The model's input (at most `max_length` tokens) and how many of its last positions
    predict the continuation."""
    if not continuation:
        raise ValueError("a continuation to score has no tokens; give it at least one token")
    if not context:
        raise ValueError("a request's context has no tokens; start it with the end-of-text token "
                         "(the model needs one token before the first it predicts)")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={max_length}; "
                         f"raise max_length or shorten the continuation")
    whole = (context + continuation)[-(max_length + 1):]
    return whole[:-1], len(continuation)


@torch.no_grad()
def score_requests(model: torch.nn.Module, requests: list[Request], *, batch_size: int, max_length: int,
                   device: str = "cpu", precision: PrecisionPolicy | None = None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities in nats, is-greedy) per request, in the
    order given.

    `model(tokens [B, T]) -> logits [B, T, V]`, called in eval mode (restored afterwards).
    Requests run longest first in batches of `batch_size`, right-padded: causal attention
    keeps padding from reaching any scored position, and batches of similar length waste
    little. `precision` (None: fp32) sets the forward's autocast; log-softmax runs in fp32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = [_window(context, continuation, max_length) for context, continuation in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(windows[i][0]))
    results: list[Any] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            scored = _score_batch(model, [windows[i] for i in chunk], [requests[i][1] for i in chunk],
                                  device=device, precision=precision)
            for i, result in zip(chunk, scored):
                results[i] = result
    finally:
        model.train(was_training)
    return results


def _score_batch(model: torch.nn.Module, windows: list[tuple[list[int], int]], continuations: list[list[int]], *,
                 device: str, precision: PrecisionPolicy | None) -> list[tuple[float, bool]]:
    """Scores one batch of windows (input tokens, continuation length)."""
    width = max(len(tokens) for tokens, _ in windows)
    batch = torch.zeros(len(windows), width, dtype=torch.long)
    for row, (tokens, _) in enumerate(windows):
        batch[row, :len(tokens)] = torch.tensor(tokens)
    autocast = precision.autocast(torch.device(device).type) if precision is not None else nullcontext()
    with autocast:
        logits = model(batch.to(device))
    out = []
    for row, ((tokens, n), continuation) in enumerate(zip(windows, continuations)):
        # positions len-n .. len-1 of the input predict the continuation's n tokens
        predicting = logits[row, len(tokens) - n:len(tokens)].float().log_softmax(-1)
        target = torch.tensor(continuation, device=predicting.device)
        logprob = predicting.gather(-1, target[:, None]).sum().item()
        greedy = bool((predicting.argmax(-1) == target).all())
        out.append((logprob, greedy))
    return out


def rolling_requests(tokens: list[int], *, prefix: int, max_length: int) -> list[Request]:
    """Requests that together score every token of a document exactly once, each with as much
    context as fits: chunks of `max_length` tokens, each predicted from the `prefix` token
    (e.g. end-of-text) and the document before it. Summing their scores gives the document's
    log-likelihood given `prefix`."""
    full = [prefix, *tokens]
    return [(full[:start + 1], tokens[start:start + max_length]) for start in range(0, len(tokens), max_length)]
