"""Stage 2, one task per (group of LSH bands, hash range): candidate pairs, verified.

Task r handles the bands of group `r // partitions` (every `band_groups`-th band), one band at
a time: it reads that band of every shard's band hashes, keeps those in range
`r % partitions` (hash mod partitions), and sorts them: documents sharing a band hash are
candidates (MinHash LSH; Leskovec, Rajaraman and Ullman, Mining of Massive Datasets,
ch. 3). A candidate pair is kept when its signatures' estimated Jaccard similarity reaches
the threshold. Memory: about 40 bytes per document of the corpus divided by `partitions`
(chosen from the corpus size), plus the signatures of `VERIFY_PAIRS` pairs.
"""

from __future__ import annotations

import functools

import numpy as np

from tessera.components.data.minhash import similarity
from tessera.components.data.stages.layout import TaskStep, read_rows, save_array

PAIR = np.dtype([("a", "<u8"), ("b", "<u8"), ("similarity", "<f4")])
"""A verified pair of documents by global id (shard << 32 | index in shard), a < b."""

BAND_GROUPS = 4
"""Bands are bucketed in this many tasks per hash range (a stage of few, larger tasks starts
faster than one task per band; the count is fixed, so the tasks are the same on any engine)."""
VERIFY_PAIRS = 1 << 15  # candidate pairs whose signatures are read at a time (2 x 16 MB at 128 values)
SMALL_GROUP = 16  # groups up to this size compare every pair; larger ones each member to the first


def band_groups(settings) -> int:
    return min(BAND_GROUPS, settings.dedup.num_bands)


def global_ids(shard: int, count: int) -> np.ndarray:
    return (np.uint64(shard) << np.uint64(32)) | np.arange(count, dtype=np.uint64)


def _candidates(hashes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b), a < b, of ids whose hashes are equal."""
    order = np.lexsort((ids, hashes))
    hashes, ids = hashes[order], ids[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    sizes = np.diff(np.r_[starts, hashes.size])
    pairs = starts[sizes == 2]  # most groups: one pair, taken without a Python loop
    first_a, first_b = [ids[pairs]], [ids[pairs + 1]]
    for start, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
        group = ids[start: start + size]
        if size <= SMALL_GROUP:
            i, j = _all_pairs(size)
            first_a.append(group[i])
            first_b.append(group[j])
        else:
            first_a.append(np.full(size - 1, group[0]))
            first_b.append(group[1:])
    return np.concatenate(first_a), np.concatenate(first_b)


@functools.cache
def _all_pairs(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(size, 1)


def _signature_rows(settings, ids: np.ndarray) -> np.ndarray:
    """The signatures [len(ids), num_perm] uint32 of documents `ids`, read from their shards'
    files in row order."""
    out = np.zeros((ids.size, settings.dedup.num_perm), dtype=np.uint32)
    shards = (ids >> np.uint64(32)).astype(np.int64)
    rows = (ids & np.uint64(0xFFFFFFFF)).astype(np.int64)
    for shard in np.unique(shards):
        where = np.flatnonzero(shards == shard)
        order = np.argsort(rows[where])
        out[where[order]] = read_rows(settings, "sigs", int(shard))[rows[where][order]]
    return out


class BucketStep(TaskStep):
    """Find and verify the near-duplicate pairs of one group of bands, in one hash range."""

    name = "buckets"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        group, part = divmod(rank, s.partitions)
        for band in range(group, s.dedup.num_bands, band_groups(s)):  # one band in memory at a time
            hashes, ids = [], []
            for shard in range(len(s.shards())):
                column = np.asarray(read_rows(s, "bands", shard)[:, band])
                mine = np.flatnonzero(column % np.uint64(s.partitions) == part)
                hashes.append(column[mine])
                ids.append(global_ids(shard, column.size)[mine])
            self._bucket(np.concatenate(hashes), np.concatenate(ids), band, part)

    def _bucket(self, hashes: np.ndarray, ids: np.ndarray, band: int, part: int) -> None:
        s = self.settings
        a, b = _candidates(hashes, ids)
        sim = np.zeros(a.size, dtype=np.float32)
        for start in range(0, a.size, VERIFY_PAIRS):  # signatures of a bounded number of pairs at once
            end = start + VERIFY_PAIRS
            sim[start:end] = similarity(_signature_rows(s, a[start:end]), _signature_rows(s, b[start:end]))
        keep = sim >= s.dedup.threshold
        pairs = np.zeros(int(keep.sum()), dtype=PAIR)
        pairs["a"], pairs["b"], pairs["similarity"] = a[keep], b[keep], sim[keep]
        save_array(s.root / "work" / "pairs" / f"{band:03d}.{part:03d}.npy", pairs)
