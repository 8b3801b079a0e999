"""A byte-level corpus built from the Python standard library's own source files.

Every Python installation has it, so the default run needs no download. Documents are the
`.py` files (sorted by path, so the corpus is identical on every machine with the same
Python); tokens are raw bytes 1..255, and byte 0 (absent from source text) separates
documents. Later data stages replace this with a cleaned, deduplicated, BPE-tokenized mix.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from components.interfaces import TrainingData
from registry.invariants import invariant

EOS = 0
VOCAB_SIZE = 256


@invariant("0 < val_fraction < 1", lambda val_fraction: 0 < val_fraction < 1, fix="hold out a fraction such as 0.05")
class StdlibBytes(TrainingData):
    """Train/validation byte streams of up to `max_bytes` of standard-library source.

    Args:
        max_bytes: stop reading files once this many bytes are collected.
        val_fraction: share of documents (files, every k-th one) held out for validation.
        root: folder to read `.py` files from (default: this interpreter's stdlib).
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, *, max_bytes: int = 4_000_000, val_fraction: float = 0.05, root: str | None = None):
        folder = Path(root or sysconfig.get_paths()["stdlib"])
        train: list[bytes] = []
        val: list[bytes] = []
        every = max(2, round(1 / val_fraction))
        total = 0
        for i, path in enumerate(sorted(p for p in folder.rglob("*.py") if "site-packages" not in p.parts)):
            data = path.read_bytes().replace(b"\x00", b"")
            if not data:
                continue
            (val if i % every == 0 else train).append(data)
            total += len(data)
            if total >= max_bytes:
                break
        if not train or not val:
            raise ValueError(f"no Python sources found under {folder}; pass root=<folder with .py files>")
        self.train = _join(train)
        self.val = _join(val)

    def batch(self, split: str, *, batch_size: int, seq_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random windows from `split` ("train" or "val").

        Returns tokens [B, T], targets [B, T] (tokens shifted by one) and doc_ids [B, T].
        """
        stream = self.train if split == "train" else self.val
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()]).long()
        tokens = windows[:, :-1]
        # A document id increments after each separator, so the separator closes its document.
        doc_ids = torch.cumsum(torch.nn.functional.pad(tokens[:, :-1] == EOS, (1, 0)), dim=1)
        return {"tokens": tokens, "targets": windows[:, 1:], "doc_ids": doc_ids}


def _join(docs: list[bytes]) -> torch.Tensor:
    blob = bytes([EOS]).join(docs) + bytes([EOS])
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
