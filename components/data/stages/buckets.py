"""Stage 2, one task per (group of LSH bands, hash range): candidate pairs, verified.

Task r handles the bands of group `r // partitions` (every `band_groups`-th band): it reads
those bands of every shard's band hashes, one shard at a time, keeps per band the hashes in
range `r % partitions` (hash mod partitions), and sorts each band's: documents sharing a band
hash are candidates (MinHash LSH; Leskovec, Rajaraman and Ullman, Mining of Massive Datasets,
ch. 3). A candidate pair is kept when its signatures' estimated Jaccard similarity reaches
the threshold. Memory: 16 bytes per document and band of the group, for the corpus divided by
`partitions` (chosen from the corpus size), plus the signatures it compares.
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
    """The signatures of documents `ids` (read from their shards' memory-mapped files)."""
    out = np.zeros((ids.size, settings.dedup.num_perm), dtype=np.uint64)
    shards = (ids >> np.uint64(32)).astype(np.int64)
    rows = (ids & np.uint64(0xFFFFFFFF)).astype(np.int64)
    for shard in np.unique(shards):
        where = np.flatnonzero(shards == shard)
        sigs = read_rows(settings, "sigs", int(shard))
        order = np.argsort(rows[where])
        out[where[order]] = sigs[rows[where][order]]
    return out


class BucketStep(TaskStep):
    """Find and verify the near-duplicate pairs of one band's hash range."""

    name = "buckets"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        group, part = divmod(rank, s.partitions)
        bands = list(range(group, s.dedup.num_bands, band_groups(s)))
        hashes: dict[int, list[np.ndarray]] = {band: [] for band in bands}
        ids: dict[int, list[np.ndarray]] = {band: [] for band in bands}
        for shard in range(len(s.shards())):  # one shard's band rows in memory at a time
            block = np.asarray(read_rows(s, "bands", shard)[:, bands])
            shard_ids = global_ids(shard, block.shape[0])
            for column, band in enumerate(bands):
                mine = block[:, column] % np.uint64(s.partitions) == part
                hashes[band].append(block[mine, column])
                ids[band].append(shard_ids[mine])
        for band in bands:
            self._bucket(np.concatenate(hashes.pop(band)), np.concatenate(ids.pop(band)), band, part)

    def _bucket(self, hashes: np.ndarray, ids: np.ndarray, band: int, part: int) -> None:
        s = self.settings
        a, b = _candidates(hashes, ids)
        pairs = np.zeros(a.size, dtype=PAIR)
        if a.size:
            sim = similarity(_signature_rows(s, a), _signature_rows(s, b))
            keep = sim >= s.dedup.threshold
            pairs = pairs[keep]
            pairs["a"], pairs["b"], pairs["similarity"] = a[keep], b[keep], sim[keep]
        save_array(s.root / "work" / "pairs" / f"{band:03d}.{part:03d}.npy", pairs)
