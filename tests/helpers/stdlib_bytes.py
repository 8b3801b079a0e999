"""A byte-level corpus built from the Python standard library's own source files.

Every Python installation has it, so the default run needs no download. Documents are the
`.py` files (sorted by path, so the corpus is identical on every machine with the same
Python); tokens are raw bytes 1..255, and byte 0 (absent from source text) separates
documents. Later data stages replace this with a cleaned, deduplicated, BPE-tokenized mix.
"""

from __future__ import annotations

import torch

from tessera.components.data.loader import doc_ids_from_eos
from tessera.components.data.sources.stdlib import stdlib_files
from tessera.components.interfaces import BytesPerToken, DataShare, ShardedData, TrainingData
from tessera.registry.invariants import invariant

EOS = 0
VOCAB_SIZE = 256


@invariant("0 < val_fraction < 1", lambda val_fraction: 0 < val_fraction < 1, fix="hold out a fraction such as 0.05")
class StdlibBytes(TrainingData, ShardedData, BytesPerToken):
    """Train/validation byte streams of up to `max_bytes` of standard-library source.

    Args:
        max_bytes: stop reading files once this many bytes are collected.
        val_fraction: share of documents (files, every k-th one) held out for validation.
        root: folder to read `.py` files from (default: this interpreter's stdlib).
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, *, max_bytes: int = 4_000_000, val_fraction: float = 0.05, root: str | None = None):
        train: list[bytes] = []
        val: list[bytes] = []
        every = max(2, round(1 / val_fraction))
        for i, (_, data) in enumerate(stdlib_files(root, max_bytes)):
            data = data.replace(b"\x00", b"")
            if data:
                (val if i % every == 0 else train).append(data)
        if not train or not val:
            raise ValueError(f"too few Python sources under {root or 'the stdlib'} within max_bytes={max_bytes}; "
                             f"pass root=<folder with .py files> or a larger max_bytes")
        self.train = _join(train)
        self.val = _join(val)
        self.share = DataShare(0, 1)

    def read_share(self, share: DataShare) -> None:
        """Draw share `share.rank` of `share.size` of every batch (see `batch`)."""
        self.share = share

    def bytes_per_token(self, split: str) -> float:
        """One byte per token: the tokens are the bytes."""
        return 1.0

    def batch(self, split: str, *, batch_size: int, seq_len: int,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random windows from `split` ("train" or "val").

        Returns tokens [B, T], targets [B, T] (tokens shifted by one) and doc_ids [B, T]. Under
        data parallelism every rank draws the windows of all ranks (same generator state) and
        keeps its own every world_size-th one, so the ranks' batches are disjoint and together
        are the batch one process would draw.
        """
        rank, world_size = self.share
        stream = self.train if split == "train" else self.val
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size * world_size,),
                               generator=generator)[rank::world_size]
        windows = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()]).long()
        tokens = windows[:, :-1]
        return {"tokens": tokens, "targets": windows[:, 1:], "doc_ids": doc_ids_from_eos(tokens, EOS)}


def _join(docs: list[bytes]) -> torch.Tensor:
    blob = bytes([EOS]).join(docs) + bytes([EOS])
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
