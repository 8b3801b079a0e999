"""A tessera model as an lm-evaluation-harness `LM`, so `lm_eval.simple_evaluate` can judge it,
and `evaluate_checkpoint` / `format_table`, what the command line's `evaluate` calls.

    lm = TesseraLM(model, encoding, batch_size=16, max_length=1024, device="cpu", precision="fp32")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

`encoding` is a tiktoken `Encoding` (what `TextPipeline.encoding()` returns); every request's
context starts with its end-of-text token, the token a document follows in training. Needs
the `eval` extra (`pip install 'tessera[eval]'`).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table
except ImportError as err:  # the eval extra is optional; say how to get it
    raise ImportError("tessera's lm-evaluation-harness adapter needs lm-eval: pip install 'tessera[eval]'") from err

from tessera.components.evaluate.lm_eval_tasks import jsonl_task_config
from tessera.components.evaluate.scoring import rolling_requests, score_requests
from tessera.components.evaluate.tasks import encode_pair
from tessera.components.interfaces import PrecisionPolicy

_PRECISIONS = ("fp32", "bf16")


def precision_policy(precision: str | PrecisionPolicy) -> PrecisionPolicy:
    """A `PrecisionPolicy` from "fp32" / "bf16" (or one given as is)."""
    if isinstance(precision, PrecisionPolicy):
        return precision
    from tessera.components.precision.policies import FP32, BF16Autocast

    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {_PRECISIONS}")
    return FP32() if precision == "fp32" else BF16Autocast()


class TesseraLM(LM):
    """lm-evaluation-harness's three request types over a tessera decoder.

    Args:
        model: `model(tokens [B, T]) -> logits [B, T, V]` (a `DecoderLM`); evaluated in
            eval mode, its mode restored afterwards.
        encoding: the tiktoken encoding the model was trained with.
        batch_size: sequences per forward. max_length: the most tokens a forward reads (the
            model's training sequence length, or what its position encoding allows).
        device: where the model is. precision: "fp32", "bf16" or a `PrecisionPolicy`.
        max_new_tokens: the generation budget of `generate_until` unless a request sets
            `max_gen_toks`.
    """

    def __init__(self, model: torch.nn.Module, encoding: Any, *, batch_size: int = 16, max_length: int = 1024,
                 device: str = "cpu", precision: str | PrecisionPolicy = "fp32", max_new_tokens: int = 256):
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"TesseraLM needs batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self.model = model
        self.encoding = encoding
        self.batch_size = batch_size
        self.max_length = max_length
        self._device = device
        self.precision = precision_policy(precision)
        self.max_new_tokens = max_new_tokens

    @property
    def device(self) -> str:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.encoding.eot_token

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is-greedy) per `(context, continuation)` request."""
        pairs = [encode_pair(self.encoding, *request.args) for request in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(document | end-of-text) per `(document,)` request, in windows of `max_length`
        tokens that each predict new tokens from as much of the document before them as fits."""
        out = []
        for request in requests:
            tokens = self.encoding.encode_ordinary(request.args[0])
            windows = rolling_requests(tokens, prefix=self.eot_token_id, max_length=self.max_length)
            out.append(sum(logprob for logprob, _ in self._score(windows)))
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return score_requests(self.model, pairs, batch_size=self.batch_size, max_length=self.max_length,
                              device=self._device, precision=self.precision)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or `temperature`-sampled) text after each context, cut before the first of
        the request's `until` strings; generation stops at end-of-text, at a stop string or
        after `max_gen_toks` tokens."""
        from tessera.components.generate import generate  # imported on use: sampling is a separate layer

        out = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = _stop_strings(options.pop("until", None))
            max_new = int(options.pop("max_gen_toks", self.max_new_tokens))
            keep = max(1, self.max_length - max_new)  # the prompt's newest tokens leave room for the answer
            prompt = [self.eot_token_id, *self.encoding.encode_ordinary(context)][-keep:]
            stopper = _StopAt(self.encoding, until)
            with self.precision.autocast(torch.device(self._device).type):
                generated = generate(self.model, [prompt], max_new_tokens=max_new,
                                     temperature=float(options.pop("temperature", 0.0)),
                                     eos_id=self.eot_token_id, on_token=stopper)[0]
            out.append(_cut(self.encoding.decode(generated), until))
        return out


def _stop_strings(until: Any) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class _StopAt:
    """`on_token` for one row: True once the decoded text holds a stop string."""

    def __init__(self, encoding: Any, until: list[str]):
        self.encoding, self.until, self.tokens = encoding, [s for s in until if s], []

    def __call__(self, row: int, token: int) -> bool:
        self.tokens.append(token)
        text = self.encoding.decode(self.tokens)
        return any(stop in text for stop in self.until)


def evaluate_checkpoint(model: torch.nn.Module, encoding: Any, *, tasks: list[str], limit: int | None,
                        batch_size: int, device: str, max_length: int = 1024,
                        precision: str = "fp32") -> dict[str, Any]:
    """Runs `lm_eval.simple_evaluate` on `model` (with `encoding`'s tokenizer) over `tasks`,
    at most `limit` examples each (None: all), and returns its results dict ("results" holds
    each task's metrics). A task ending in .jsonl is a local file (see `jsonl_task_config`).
    Raises ValueError when `tasks` is empty."""
    if not tasks:
        raise ValueError("evaluate_checkpoint needs at least one task (an lm-eval task name or a .jsonl file)")
    lm = TesseraLM(model, encoding, batch_size=batch_size, max_length=max_length, device=device, precision=precision)
    specs: list[Any] = [jsonl_task_config(t) if t.endswith(".jsonl") else t for t in tasks]
    # lm-eval's own task index takes seconds to build; local files alone do not need it
    manager = TaskManager(include_defaults=not all(isinstance(s, dict) for s in specs))
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False, bootstrap_iters=0,
                                      task_manager=manager)
    if results is None:  # lm-eval returns None on processes other than the first
        return {}
    return results


def format_table(results: dict[str, Any]) -> str:
    """`results` (from `evaluate_checkpoint`) as lm-eval's markdown table of task, metric, value."""
    return make_table(results)
