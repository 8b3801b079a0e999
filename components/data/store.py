"""Tokenized documents on disk: per (domain, split), token files in shard order, memory-mapped.

Layout under a folder: `{domain}.{split}.{shard}.bin` (uint16 when every id fits, else uint32;
each document's tokens followed by EOS) and `index.json` (dtype, EOS id, per array its token
and document counts and its shard files in order). Reading maps the files without loading
them; a (domain, split) reads as one stream, its shards back to back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_store(folder: Path, arrays: dict[tuple[str, str], list[list[int]]], *, eos: int, vocab_size: int) -> None:
    """Write `arrays[(domain, split)]` = token lists of documents, one shard each (for tests
    and small hand-made stores; the pipeline's tokenize stage writes many shards)."""
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    folder.mkdir(parents=True, exist_ok=True)
    index = {"dtype": np.dtype(dtype).name, "eos": eos, "vocab_size": vocab_size, "arrays": {}}
    for (domain, split), docs in sorted(arrays.items()):
        flat = np.fromiter((t for doc in docs for t in (*doc, eos)), dtype=dtype)
        name = f"{domain}.{split}.00000.bin"
        flat.tofile(folder / name)
        index["arrays"][f"{domain}.{split}"] = {"tokens": int(flat.size), "documents": len(docs),
                                                "shards": [{"file": name, "tokens": int(flat.size)}]}
    (folder / "index.json").write_text(json.dumps(index, indent=2))


class TokenStream:
    """Token files read as one array: `size`, and slices `[start:stop]` (step 1) that may
    cross from one file into the next."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if p.size]
        self.starts = np.cumsum([0] + [p.size for p in self.parts])
        self.size = int(self.starts[-1])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.size

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[0:self.size], dtype=dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream reads contiguous slices only")
        start, stop, _ = key.indices(self.size)
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            part, offset = self.parts[first], int(self.starts[first])
            end = min(stop, offset + part.size)
            pieces.append(np.asarray(part[start - offset: end - offset]))
            start, first = end, first + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class TokenStore:
    """Read access to a folder written by the tokenize stage or `write_store`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self.eos = self.index["eos"]
        self.vocab_size = self.index["vocab_size"]

    def domains(self, split: str) -> list[str]:
        return sorted(name.rsplit(".", 1)[0] for name, info in self.index["arrays"].items()
                      if name.endswith(f".{split}") and info["tokens"] > 0)

    def tokens(self, domain: str, split: str) -> TokenStream:
        """The token stream of one domain and split (its shard files memory-mapped)."""
        shards = self.index["arrays"].get(f"{domain}.{split}", {"shards": []})["shards"]
        return TokenStream([np.memmap(self.folder / s["file"], dtype=self.index["dtype"], mode="r")
                            for s in shards if s["tokens"]])

    def size(self, domain: str, split: str) -> int:
        return self.index["arrays"].get(f"{domain}.{split}", {"tokens": 0})["tokens"]
