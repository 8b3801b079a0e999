"""Multiple-choice tasks scored by log-likelihood: the offline JSONL format, its tokenized
form, and accuracy.

A task file holds one JSON object per line:

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

`context` is the text the model reads, `choices` the candidate continuations (exactly as
they follow the context: put the separating space in the choice), `label` the index of the
right one. The model picks the choice with the highest summed log-probability given the
context (lm-evaluation-harness's `acc`); accuracy is the share of examples it gets right.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from tessera.components.evaluate.scoring import score_requests
from tessera.components.interfaces import PrecisionPolicy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    """One multiple-choice question as token ids: `context` (starting with end-of-text, so
    the first token has something to be predicted from) and each choice's tokens."""

    context: list[int]
    choices: list[list[int]]
    label: int


def encode_pair(encoding, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair: end-of-text, then the context; the
    continuation apart. Spaces ending the context move to the continuation, where a
    byte-level BPE expects them (" Paris" is one token; " " + "Paris" two rare ones)."""
    stripped = context.rstrip(" ")
    moved = context[len(stripped):]
    return [encoding.eot_token, *encoding.encode_ordinary(stripped)], encoding.encode_ordinary(moved + continuation)


def read_jsonl_task(path: str | Path) -> list[dict]:
    """The rows of a task file, checked: each has a string `context`, a list of at least two
    string `choices` and an integer `label` indexing them. Raises ValueError naming the file,
    line and fault."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist; give a JSONL file of "
                         '{"context": ..., "choices": [...], "label": i} rows')
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        _check_row(row, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise ValueError(f"task file {path} has no examples")
    return rows


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("context"), str):
        raise ValueError(f"{where}: needs a string 'context'")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: needs 'choices', a list of at least two non-empty strings")
    label = row.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: 'label' must be an integer index into the {len(choices)} choices, got {label!r}")


def tokenize_rows(rows: list[dict], encoding) -> list[Example]:
    """Rows of the task format as `Example`s, with `encode_pair`'s tokenization."""
    examples = []
    for row in rows:
        pairs = [encode_pair(encoding, row["context"], choice) for choice in row["choices"]]
        examples.append(Example(context=pairs[0][0], choices=[c for _, c in pairs], label=row["label"]))
    return examples


def choice_scores(model: torch.nn.Module, examples: list[Example], *, batch_size: int, max_length: int,
                  device: str = "cpu", precision: PrecisionPolicy | None = None) -> list[list[float]]:
    """Each example's summed log-probability of each choice given its context."""
    requests = [(ex.context, choice) for ex in examples for choice in ex.choices]
    scores = iter(score_requests(model, requests, batch_size=batch_size, max_length=max_length, device=device,
                                 precision=precision))
    return [[next(scores)[0] for _ in ex.choices] for ex in examples]


def accuracy(model: torch.nn.Module, examples: list[Example], *, batch_size: int, max_length: int,
             device: str = "cpu", precision: PrecisionPolicy | None = None) -> float:
    """The share of `examples` whose best-scoring choice (the first, on a tie) is the label."""
    scores = choice_scores(model, examples, batch_size=batch_size, max_length=max_length, device=device,
                           precision=precision)
    right = sum(max(range(len(s)), key=lambda i: (s[i], -i)) == ex.label for s, ex in zip(scores, examples))
    return right / max(1, len(examples))
