"""The built-in multiple-choice task `heldout_cloze`: which continuation is the real one?

Made from the held-out (validation) documents of the run's own corpus, so it needs no
download and no text the model trained on: each question is a document's first
`context_tokens` tokens, and the choices are that document's next `continuation_tokens`
tokens and the same span of `n_choices - 1` other documents. A model that has learnt
nothing scores 1 / n_choices; one that follows the text picks the real continuation.
The same corpus and seed give the same questions.
"""

from __future__ import annotations

import numpy as np

from tessera.components.evaluate.tasks import Example

NAME = "heldout_cloze"


def documents(arrays: list[np.ndarray], *, eos: int, min_tokens: int) -> list[np.ndarray]:
    """The documents of token arrays (each a run of documents closed by `eos`) with at least
    `min_tokens` tokens, in order."""
    docs = []
    for array in arrays:
        array = np.asarray(array)
        ends = np.flatnonzero(array == eos)
        starts = np.concatenate(([0], ends + 1))
        for start, end in zip(starts, np.concatenate((ends, [array.size]))):
            if end - start >= min_tokens:
                docs.append(array[start:end])
    return docs


def heldout_cloze(arrays: list[np.ndarray], *, eos: int, examples: int = 64, context_tokens: int = 32,
                  continuation_tokens: int = 8, n_choices: int = 4, seed: int = 0) -> list[Example]:
    """Up to `examples` questions from the documents of `arrays` (the validation split's
    token arrays, one per domain), spread evenly over them; raises ValueError when fewer than
    `n_choices` documents are long enough."""
    span = slice(context_tokens, context_tokens + continuation_tokens)
    docs = documents(arrays, eos=eos, min_tokens=span.stop)
    if len(docs) < n_choices:
        raise ValueError(f"{NAME}: the validation split has {len(docs)} documents of at least {span.stop} tokens, "
                         f"fewer than the {n_choices} choices a question needs; use a larger corpus or val_fraction")
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, len(docs), num=min(examples, len(docs)), endpoint=False).astype(int)
    out = []
    for i in picks:
        real = docs[i][span].tolist()
        others = [docs[j][span].tolist() for j in _others(i, len(docs), rng)]
        distractors = [o for o in others if o != real][: n_choices - 1]
        if len(distractors) < n_choices - 1:
            continue  # the same span in too many documents (boilerplate): no fair question
        label = int(rng.integers(n_choices))
        choices = distractors[:label] + [real] + distractors[label:]
        out.append(Example(context=[eos, *docs[i][:context_tokens].tolist()], choices=choices, label=label))
    return out


def _others(i: int, n: int, rng: np.random.Generator) -> list[int]:
    """A few documents other than `i`, in a seeded random order (spares for duplicates)."""
    candidates = rng.permutation(n)[:16]
    return [int(j) for j in candidates if j != i]
