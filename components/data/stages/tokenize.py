"""Stages 4 and 5: the BPE trained on a sample (one task), then every shard tokenized.

The sample is the kept training documents in corpus order, up to an equal byte budget per
domain (so a large domain does not crowd the others out of the vocabulary); reading stops
once every domain's budget is full. Tokenizing writes, per shard and (domain, split), the
documents' tokens each followed by EOS to `tokens/DOMAIN.SPLIT.NNNNN.bin`, encoding
`BATCH_BYTES` of text at a time.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tessera.components.data.stages.kept import kept_documents
from tessera.components.data.stages.layout import TaskStep, stats_path, write_json
from tessera.components.data.tokenizer import encode_documents, load_encoding, named_encoding, train_bpe

BATCH_BYTES = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encoding_of(settings):
    """The run's tiktoken encoding: a named one, or the one trained into tokenizer/."""
    if settings.encoding_name is not None:
        return named_encoding(settings.encoding_name)
    return load_encoding(settings.root / "tokenizer")


class TrainTokenizerStep(TaskStep):
    """Train the byte-level BPE on a sample of the kept training documents."""

    name = "tokenizer"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        budget = s.tokenizer_sample_bytes // max(1, len(s.domains))
        taken: dict[str, int] = defaultdict(int)
        sample: list[str] = []
        for shard in range(len(s.shards())):
            if all(taken[d] >= budget for d in s.domains):
                break
            for doc in kept_documents(s, shard):
                if doc.split == "train" and taken[doc.domain] < budget:
                    sample.append(doc.text)
                    taken[doc.domain] += len(doc.text.encode("utf-8", "replace"))
        train_bpe(sample, vocab_size=s.vocab_size, folder=s.root / "tokenizer")


class TokenizeStep(TaskStep):
    """Tokenize one shard's kept documents into per-(domain, split) token files."""

    name = "tokenize"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        encoding = encoding_of(s)
        dtype, eos = token_dtype(s.vocab_size), encoding.eot_token
        files: dict[tuple[str, str], BinaryIO] = {}
        stats: dict[str, dict[str, int]] = {}
        batch: dict[tuple[str, str], list[str]] = defaultdict(list)
        nbytes: dict[tuple[str, str], int] = defaultdict(int)
        size = 0

        def flush() -> None:
            for (domain, split), texts in batch.items():
                eos_row = np.array([eos], dtype=dtype)
                pieces = [p for ids in encode_documents(encoding, texts) for p in (ids, eos_row)]
                flat = np.concatenate(pieces).astype(dtype, copy=False)
                key = (domain, split)
                if key not in files:
                    files[key] = open(_token_file(s.root, domain, split, rank, tmp=True), "wb")
                files[key].write(flat.tobytes())
                row = stats.setdefault(f"{domain}.{split}", {"documents": 0, "bytes": 0, "tokens": 0})
                row["documents"] += len(texts)
                row["bytes"] += nbytes.pop(key)
                row["tokens"] += int(flat.size)
            batch.clear()

        for doc in kept_documents(s, rank):
            batch[(doc.domain, doc.split)].append(doc.text)
            nbytes[(doc.domain, doc.split)] += doc.nbytes
            size += doc.nbytes
            if size >= BATCH_BYTES:
                flush()
                size = 0
        flush()
        for (domain, split), f in files.items():
            f.close()
            _token_file(s.root, domain, split, rank, tmp=True).replace(_token_file(s.root, domain, split, rank))
        write_json(stats_path(s, "tokenize", rank), stats)


def _token_file(root: Path, domain: str, split: str, shard: int, *, tmp: bool = False) -> Path:
    path = root / "tokens" / f"{domain}.{split}.{shard:05d}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".tmp") if tmp else path
