"""Tokenized documents on disk: one flat token array per (domain, split), memory-mapped.

Layout under a folder: `{domain}.{split}.bin` (uint16 when every id fits, else uint32; each
document's tokens followed by EOS) and `index.json` (dtype, EOS id, per-array token and
document counts). Reading maps the arrays without loading them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_store(folder: Path, arrays: dict[tuple[str, str], list[list[int]]], *, eos: int, vocab_size: int) -> None:
    """Write `arrays[(domain, split)]` = token lists of documents."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    index = {"dtype": np.dtype(dtype).name, "eos": eos, "vocab_size": vocab_size, "arrays": {}}
    for (domain, split), docs in sorted(arrays.items()):
        flat = np.fromiter((t for doc in docs for t in (*doc, eos)), dtype=dtype)
        flat.tofile(folder / f"{domain}.{split}.bin")
        index["arrays"][f"{domain}.{split}"] = {"tokens": int(flat.size), "documents": len(docs)}
    (folder / "index.json").write_text(json.dumps(index, indent=2))


class TokenStore:
    """Read access to a folder written by `write_store`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self.eos = self.index["eos"]
        self.vocab_size = self.index["vocab_size"]

    def domains(self, split: str) -> list[str]:
        return sorted(name.rsplit(".", 1)[0] for name, info in self.index["arrays"].items()
                      if name.endswith(f".{split}") and info["tokens"] > 0)

    def tokens(self, domain: str, split: str) -> np.ndarray:
        """The memory-mapped flat token array of one domain and split."""
        return np.memmap(self.folder / f"{domain}.{split}.bin", dtype=self.index["dtype"], mode="r")

    def size(self, domain: str, split: str) -> int:
        return self.index["arrays"].get(f"{domain}.{split}", {"tokens": 0})["tokens"]
