"""Stage 2, one task per (group of LSH bands, hash range): candidate pairs, verified.

Task r handles the bands of group `r // partitions` (every `band_groups`-th band) one at a
time: it reads that band of every shard's band hashes, keeps those in hash range
`r % partitions` (hash mod partitions), and sorts them: documents sharing a band hash are
candidates (MinHash LSH, Broder 1997; Leskovec et al., Mining of Massive Datasets, ch. 3).
A candidate pair is kept when its signatures' estimated Jaccard similarity reaches the
threshold. Memory: the task's slice of one band, 16 bytes per document of the corpus divided
by `partitions` (chosen from the corpus size), plus the signatures it compares.
"""

from __future__ import annotations

import numpy as np

from tessera.components.data.minhash import similarity
from tessera.components.data.stages.layout import TaskStep, save_array

PAIR = np.dtype([("a", "<u8"), ("b", "<u8"), ("similarity", "<f4")])
"""A verified pair of documents by global id (shard << 32 | index in shard), a < b."""

BAND_GROUPS = 4
"""Bands are bucketed in this many tasks per hash range (a stage of few, larger tasks starts
faster than one task per band; the count is fixed, so the tasks are the same on any engine)."""
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
    first_a, first_b = [], []
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        group = ids[start: start + size]
        if size <= SMALL_GROUP:
            i, j = np.triu_indices(size, 1)
            first_a.append(group[i])
            first_b.append(group[j])
        else:
            first_a.append(np.full(size - 1, group[0]))
            first_b.append(group[1:])
    if not first_a:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return np.concatenate(first_a), np.concatenate(first_b)


def _signature_rows(settings, ids: np.ndarray) -> np.ndarray:
    """The signatures of documents `ids` (read from their shards' memory-mapped files)."""
    out = np.zeros((ids.size, settings.dedup.num_perm), dtype=np.uint64)
    shards = (ids >> np.uint64(32)).astype(np.int64)
    rows = (ids & np.uint64(0xFFFFFFFF)).astype(np.int64)
    for shard in np.unique(shards):
        where = np.flatnonzero(shards == shard)
        sigs = np.load(settings.work("sigs", int(shard), ".npy"), mmap_mode="r")
        order = np.argsort(rows[where])
        out[where[order]] = sigs[rows[where][order]]
    return out


class BucketStep(TaskStep):
    """Find and verify the near-duplicate pairs of one band's hash range."""

    name = "buckets"

    def run_task(self, rank: int, world_size: int) -> None:
        group, part = divmod(rank, self.settings.partitions)
        for band in range(group, self.settings.dedup.num_bands, band_groups(self.settings)):
            self._bucket(band, part)

    def _bucket(self, band: int, part: int) -> None:
        s = self.settings
        hashes, ids = [], []
        for shard in range(len(s.shards())):
            column = np.load(s.work("bands", shard, ".npy"), mmap_mode="r")[band]
            mine = np.flatnonzero(column % np.uint64(s.partitions) == part)
            hashes.append(np.asarray(column[mine]))
            ids.append(global_ids(shard, column.size)[mine])
        a, b = _candidates(np.concatenate(hashes), np.concatenate(ids))
        pairs = np.zeros(a.size, dtype=PAIR)
        if a.size:
            sim = similarity(_signature_rows(s, a), _signature_rows(s, b))
            keep = sim >= s.dedup.threshold
            pairs = pairs[keep]
            pairs["a"], pairs["b"], pairs["similarity"] = a[keep], b[keep], sim[keep]
        save_array(s.root / "work" / "pairs" / f"{band:03d}.{part:03d}.npy", pairs)
