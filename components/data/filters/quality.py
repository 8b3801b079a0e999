"""A quality classifier: logistic regression on hashed word n-grams, trained on the fly from a
positive reference source against a negative one (or loaded from a file)."""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from tessera.components.data.document import Document
from tessera.components.interfaces import DataSource, DocumentFilter
from tessera.registry.kinds import DATA_FILTER


@DATA_FILTER.register("quality_classifier")
@dataclasses.dataclass(kw_only=True)
class QualityClassifier(DocumentFilter):
    """Keeps documents whose P(positive) >= `threshold`.

    Features: word 1..`ngram`-grams hashed (crc32, so identical across processes) into
    `n_features` buckets, log(1 + count), L2-normalised. The model is fitted when first used:
    from `model_path` if that file exists, else from up to `max_documents` documents of
    `positive` (label 1) and `negative` (label 0), then saved to `model_path` if given.
    """

    positive: DataSource | None = None
    negative: DataSource | None = None
    model_path: str | None = None
    threshold: float = 0.5
    n_features: int = 2**18
    ngram: int = 2
    max_documents: int = 5000
    steps: int = 200
    l2: float = 1e-4

    def __post_init__(self) -> None:
        self._weights: torch.Tensor | None = None

    def _features(self, texts: Sequence[str]) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for r, text in enumerate(texts):
            words = text.lower().split()
            counts: dict[int, int] = {}
            for n in range(1, self.ngram + 1):
                for i in range(len(words) - n + 1):
                    bucket = zlib.crc32(" ".join(words[i: i + n]).encode()) % self.n_features
                    counts[bucket] = counts.get(bucket, 0) + 1
            norm = math.sqrt(sum(math.log1p(c) ** 2 for c in counts.values())) or 1.0
            for bucket, c in counts.items():
                rows.append(r)
                cols.append(bucket)
                vals.append(math.log1p(c) / norm)
        index = torch.tensor([rows, cols], dtype=torch.long)
        return torch.sparse_coo_tensor(index, torch.tensor(vals), (len(texts), self.n_features),
                                       check_invariants=False).coalesce()

    def fit(self, positives: Sequence[str], negatives: Sequence[str]) -> None:
        """Fit the logistic model (full-batch L-BFGS, L2 penalty `l2`)."""
        if not positives or not negatives:
            raise ValueError("quality_classifier needs documents in both the positive and the negative set")
        x = self._features(list(positives) + list(negatives))
        y = torch.cat((torch.ones(len(positives)), torch.zeros(len(negatives))))
        w = torch.zeros(self.n_features, requires_grad=True)
        bias = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = torch.sparse.mm(x, w[:, None]).squeeze(1) + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + self.l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        self._weights = torch.cat((w.detach(), bias.detach()[None]))  # [n_features weights | bias]

    def _ensure_model(self) -> torch.Tensor:
        if self._weights is None:
            path = Path(self.model_path) if self.model_path else None
            if path is not None and path.exists():
                self._weights = torch.load(path, weights_only=True)
            else:
                if self.positive is None or self.negative is None:
                    raise ValueError("quality_classifier: give positive and negative sources, "
                                     "or an existing model_path")
                take = self.max_documents
                pos = [d.text for _, d in zip(range(take), self.positive.documents())]
                neg = [d.text for _, d in zip(range(take), self.negative.documents())]
                self.fit(pos, neg)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(self._weights, path)
        return self._weights

    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """P(positive) for each text."""
        weights = self._ensure_model()
        logits = torch.sparse.mm(self._features(texts), weights[:-1, None]).squeeze(1) + weights[-1]
        return torch.sigmoid(logits)

    def process(self, doc: Document) -> Document | None:
        return doc if self.score([doc.text])[0].item() >= self.threshold else None
