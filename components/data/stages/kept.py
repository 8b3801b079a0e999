"""Reading back a shard's kept documents (after the cluster stage), with their split."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from tessera.components.data.stages.cluster import moves_of
from tessera.components.data.stages.layout import Settings, held_out, read_rows


class Kept(NamedTuple):
    """One kept document: its row in the shard, text, domain, split ("train" / "val") and
    UTF-8 size."""

    row: int
    text: str
    domain: str
    split: str
    nbytes: int


def kept_documents(settings: Settings, shard: int) -> Iterator[Kept]:
    """The documents of input shard `shard` that survive deduplication, in order, streamed
    from the shard's zstd file (one document in memory at a time)."""
    import zstandard

    meta = read_rows(settings, "meta", shard)
    drop = set(np.load(settings.work("drop", shard, ".npy")).tolist())
    moves = moves_of(settings, shard)
    val = held_out(meta["key"], settings.val_fraction)
    with open(settings.work("docs", shard, ".zst"), "rb") as raw:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        for row, nbytes in enumerate(meta["nbytes"].tolist()):
            data = reader.read(nbytes)
            if row in drop:
                continue
            split = moves.get(row, "val" if val[row] else "train")
            yield Kept(row, data.decode("utf-8", "surrogatepass"), settings.domains[int(meta["domain"][row])], split,
                       nbytes)
