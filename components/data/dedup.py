"""Exact and near-duplicate removal: content hashes, then MinHash + LSH on word shingles.

Near duplicates are pairs whose estimated Jaccard similarity of word `shingle`-grams is at
least `threshold`; every connected group of such pairs (a cluster) keeps its first document.
Signatures come from `minhash.signatures` (vectorized shingle hashing, rensa's MinHash);
candidate pairs are documents with an equal LSH band, grouped with numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from tessera.components.data import minhash
from tessera.components.data.document import Document

VERIFY_CHUNK = 1 << 14
"""Candidate pairs compared at once (two gathered [chunk, num_perm] arrays: 8 MB each at 128)."""


def shingles(text: str, size: int) -> list[str]:
    """Lower-cased word `size`-grams of `text` (the whole text when it is shorter).

    The reference definition: `minhash.shingle_hashes` hashes the same set without building it."""
    words = text.lower().split()
    if len(words) <= size:
        return [" ".join(words)]
    return [" ".join(words[i: i + size]) for i in range(len(words) - size + 1)]


@dataclasses.dataclass
class DedupResult:
    """Which documents survive, and what was removed."""

    kept: list[Document]
    exact_removed: int
    near_removed: int
    clusters: int


@dataclasses.dataclass(kw_only=True)
class Deduplicator:
    """Exact-hash then MinHash-LSH near-duplicate removal, in memory (for corpora that fit).

    Args:
        threshold: Jaccard similarity from which two documents are near duplicates.
        num_perm: MinHash permutations; num_bands: LSH bands (num_perm must divide).
        shingle: words per shingle.
        seed: MinHash seed (the result is deterministic given it).
    """

    threshold: float = 0.8
    num_perm: int = 128
    num_bands: int = 16
    shingle: int = 3
    seed: int = 42

    def __call__(self, docs: Sequence[Document]) -> DedupResult:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        seen: set[str] = set()
        unique: list[Document] = []
        for doc in docs:
            key = doc.key  # a SHA-1 of the text: computed once
            if key not in seen:
                seen.add(key)
                unique.append(doc)
        exact_removed = len(docs) - len(unique)
        sigs = minhash.signatures([d.text for d in unique], shingle=self.shingle, num_perm=self.num_perm,
                                  seed=self.seed)
        roots = near_duplicate_roots(sigs, num_bands=self.num_bands, threshold=self.threshold)
        own = roots == np.arange(len(unique))
        kept = [doc for doc, keep in zip(unique, own.tolist()) if keep]
        return DedupResult(kept=kept, exact_removed=exact_removed, near_removed=len(unique) - len(kept),
                           clusters=len(np.unique(roots[~own])))


def near_duplicate_roots(sigs: np.ndarray, *, num_bands: int, threshold: float) -> np.ndarray:
    """The first (smallest) index [n] int64 of each row's cluster of near duplicates.

    sigs [n, num_perm]: MinHash signatures. Two rows are linked when they share an LSH band
    (`minhash.band_hashes`) and their estimated Jaccard similarity is >= threshold; a
    cluster is a connected group of links, so rows i with result[i] == i are the ones to keep.
    Rows with identical signatures are linked outright (they share every band and agree
    everywhere), so only the first of each enters the banding; and a candidate pair whose rows
    are already joined is not compared. Both keep big groups of near copies (boilerplate
    pages) from costing a comparison per pair of members.
    """
    n = len(sigs)
    same = _first_identical(sigs)
    reps = np.flatnonzero(same == np.arange(n))
    rep_sigs = sigs[reps]
    labels = np.arange(len(reps))  # each rep's cluster so far, by its smallest member
    found: list[np.ndarray] = []
    waiting = 0
    for pairs in _bucket_pair_chunks(minhash.band_hashes(rep_sigs, num_bands)):
        pairs = pairs[labels[pairs[:, 0]] != labels[pairs[:, 1]]]
        linked = pairs[_similar(rep_sigs, pairs, threshold)]
        found.append(linked)
        waiting += len(linked)
        if waiting >= len(reps):  # fold the links in now and then, so later chunks skip more
            labels, found, waiting = _join(labels, found), [], 0
    labels = _join(labels, found)
    return reps[labels][np.searchsorted(reps, same)]


def _first_identical(sigs: np.ndarray) -> np.ndarray:
    """For each row of sigs [n, num_perm], the first row [n] int64 with the same signature
    (grouped by a 64-bit hash of the whole row, then checked value by value)."""
    whole = minhash.band_hashes(sigs, 1)[:, 0]
    _, first, inverse = np.unique(whole, return_index=True, return_inverse=True)
    same = first[inverse.reshape(-1)]
    return np.where((sigs == sigs[same]).all(axis=1), same, np.arange(len(sigs)))  # unless hashes collided


def _similar(sigs: np.ndarray, pairs: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each pair [p, 2] of rows has estimated Jaccard >= threshold [p] bool, compared
    VERIFY_CHUNK pairs at a time."""
    out = np.zeros(len(pairs), dtype=bool)
    for lo in range(0, len(pairs), VERIFY_CHUNK):
        a, b = pairs[lo: lo + VERIFY_CHUNK].T
        out[lo: lo + VERIFY_CHUNK] = minhash.similarity(sigs[a], sigs[b]) >= threshold
    return out


def _join(labels: np.ndarray, found: list[np.ndarray]) -> np.ndarray:
    """labels [n] (each node's cluster, by its smallest member) after adding the links in
    `found` (arrays [p, 2] of nodes)."""
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    if len(pairs) == 0:
        return labels
    return cluster_roots(len(labels), labels[pairs])[labels]


def candidate_pairs(bands: np.ndarray) -> np.ndarray:
    """Every pair of rows [p, 2] int64 (i < j, each pair once, sorted) that agree in at least
    one column of bands [n, num_bands] (a band hash per row and band)."""
    pairs = np.concatenate([np.empty((0, 2), dtype=np.int64), *_bucket_pair_chunks(bands)])
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0)


def _bucket_pair_chunks(bands: np.ndarray) -> Iterator[np.ndarray]:
    """The pairs of rows [p, 2] int64 that share a bucket (equal values in a column of
    bands [n, num_bands]), band by band: for each distance d, every (k, k + d) inside a
    bucket of the band's rows sorted by bucket. A pair sharing several bands comes once per
    band; no chunk holds more than n pairs."""
    n = len(bands)
    for column in bands.T:
        order = np.argsort(column, kind="stable")
        ranked = column[order]
        tie = ranked[1:] == ranked[:-1]
        if not tie.any():
            continue
        member = np.zeros(n, dtype=bool)  # rows whose bucket holds another row
        member[1:] |= tie
        member[:-1] |= tie
        ids, keys = order[member], ranked[member]
        bucket = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        sizes = np.diff(np.r_[bucket, len(keys)])
        ends = np.repeat(bucket + sizes, sizes)  # the position just past each row's bucket
        pos, d = np.arange(len(ids)), 1
        while len(pos := pos[pos + d < ends[pos]]):
            yield np.stack([ids[pos], ids[pos + d]], axis=1)
            d += 1


def cluster_roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest member [n] int64 of each node's connected component in the graph on n
    nodes with edges pairs [p, 2]. Vectorized label propagation: each round hooks the larger
    of an edge's two labels onto the smaller, then jumps pointers until every label is a
    root; at the fixed point both ends of every edge carry their component's minimum."""
    labels = np.arange(n)
    if len(pairs) == 0:
        return labels
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        hooked = labels.copy()
        np.minimum.at(hooked, la, low)
        np.minimum.at(hooked, lb, low)
        while not np.array_equal(jumped := hooked[hooked], hooked):
            hooked = jumped
        if np.array_equal(hooked, labels):
            return labels
        labels = hooked
