"""Stage 3, one task: duplicate clusters -> what to drop, and the train / validation cut.

Every verified pair joins two documents; each connected group (a cluster) keeps its first
document in corpus order (the lowest global id) and drops the others, on every engine alike.
A dropped document whose content key equals its keeper's is an exact duplicate, any other a
near duplicate. Memory: the pairs (about one per duplicate and band), not the corpus; the
shards' metadata is read one shard at a time.

The split: a document is held out for validation by its content key (`held_out`); a domain
whose kept documents all fall on one side gets the one nearest the cut moved across, and a
domain with fewer than two kept documents is an error (recorded for the driver to raise).
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from tessera.components.data.stages.buckets import PAIR
from tessera.components.data.stages.layout import TaskStep, held_out, read_rows, save_array, stats_path, write_json

LOW = np.uint64(0xFFFFFFFF)


def _roots(pairs: np.ndarray) -> dict[int, int]:
    """Union-find over the pairs: every member id -> its cluster's lowest id."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        root = i
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(i, i) != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for a, b in zip(pairs["a"].tolist(), pairs["b"].tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: find(i) for i in list(parent)}


def _read_pairs(settings) -> np.ndarray:
    """The distinct verified pairs of every band, in the order first found: a pair found in
    several bands is held once (the files are joined one at a time)."""
    pairs = np.zeros(0, dtype=PAIR)
    for path in sorted((settings.root / "work" / "pairs").glob("*.npy")):
        joined = np.concatenate([pairs, np.load(path)])
        _, first = np.unique(np.stack([joined["a"], joined["b"]], axis=1), axis=0, return_index=True)
        pairs = joined[np.sort(first)]
    return pairs


class ClusterStep(TaskStep):
    """Decide which documents to drop and where the train / validation cut repairs go."""

    name = "cluster"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        roots = _roots(_read_pairs(s)) if s.dedup is not None else {}
        dropped = sorted(i for i, r in roots.items() if r != i)
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i in dropped:
            by_shard[i >> 32].append(i & 0xFFFFFFFF)
        metas = [read_rows(s, "meta", shard) for shard in range(len(s.shards()))]
        report = {d: {"docs_in": 0, "bytes_in": 0, "exact": 0, "near": 0, "bytes_out": 0,
                      "clusters": len({r for i, r in roots.items() if r != i and _domain(metas, r, s) == d})}
                  for d in s.domains}
        ends = defaultdict(lambda: {"train": None, "val": None, "min_train": None, "max_val": None})
        counts = defaultdict(lambda: {"train": 0, "val": 0})
        for shard, meta in enumerate(metas):
            drop = np.asarray(by_shard.get(shard, []), dtype=np.int64)
            save_array(s.work("drop", shard, ".npy"), drop)
            keep = np.ones(meta.size, dtype=bool)
            keep[drop] = False
            self._count(report, meta, keep, drop, shard, roots, metas)
            self._split_ends(meta, keep, shard, ends, counts)
        write_json(s.root / "stats" / "split.json", self._repairs(ends, counts))
        if s.rejects and dropped:
            _list_dropped(s, roots, dropped, metas)
        write_json(stats_path(s, "cluster", 0), report)

    def _count(self, report, meta, keep, drop, shard, roots, metas) -> None:
        s = self.settings
        for domain_id, domain in enumerate(s.domains):
            mine = meta["domain"] == domain_id
            row = report[domain]
            row["docs_in"] += int(mine.sum())
            row["bytes_in"] += int(meta["nbytes"][mine].sum())
            row["bytes_out"] += int(meta["nbytes"][mine & keep].sum())
        for i in drop.tolist():
            root = roots[(shard << 32) | i]
            exact = metas[root >> 32]["key"][root & 0xFFFFFFFF] == meta["key"][i]
            report[s.domains[int(meta["domain"][i])]]["exact" if exact else "near"] += 1

    def _split_ends(self, meta, keep, shard, ends, counts) -> None:
        """Track, per domain, the kept train document with the lowest key and the kept
        validation document with the highest (the ones moved if a side is empty)."""
        val = held_out(meta["key"], self.settings.val_fraction)
        for domain_id, domain in enumerate(self.settings.domains):
            for split, side in (("train", keep & ~val), ("val", keep & val)):
                rows = np.flatnonzero(side & (meta["domain"] == domain_id))
                counts[domain][split] += rows.size
                if not rows.size:
                    continue
                pick = rows[np.argmin(meta["key"][rows])] if split == "train" else rows[np.argmax(meta["key"][rows])]
                key = int(meta["key"][pick])
                best = ends[domain]["min_train" if split == "train" else "max_val"]
                if best is None or (key < best[0] if split == "train" else key > best[0]):
                    ends[domain]["min_train" if split == "train" else "max_val"] = (key, shard, int(pick))

    def _repairs(self, ends, counts) -> dict:
        moves, errors = [], []
        for domain in self.settings.domains:
            n = counts[domain]
            if n["train"] + n["val"] < 2:
                errors.append(f"domain {domain!r} has {n['train'] + n['val']} document(s) after cleaning; it needs "
                              f"at least 2 (one for training, one held out): give it more documents (a single txt "
                              f"file is one document unless split: data.txt_split=paragraph or =line)")
            elif not n["val"]:
                _, shard, row = ends[domain]["min_train"]
                moves.append([shard, row, "val"])
            elif not n["train"]:
                _, shard, row = ends[domain]["max_val"]
                moves.append([shard, row, "train"])
        return {"moves": moves, "errors": errors}


def _domain(metas: list[np.ndarray], gid: int, settings) -> str:
    return settings.domains[int(metas[gid >> 32]["domain"][gid & 0xFFFFFFFF])]


def moves_of(settings, shard: int) -> dict[int, str]:
    """Rows of `shard` moved across the train / validation cut -> their split."""
    repairs = json.loads((settings.root / "stats" / "split.json").read_text())
    return {row: split for s, row, split in repairs["moves"] if s == shard}


def _list_dropped(settings, roots: dict[int, int], dropped: list[int], metas: list[np.ndarray]) -> None:
    """rejects/DOMAIN.dedup.jsonl: each dropped document's source, the source of the one kept
    in its place (read from the shards' source lists)."""
    wanted = set(dropped) | {roots[i] for i in dropped}
    sources: dict[int, str] = {}
    for shard in sorted({i >> 32 for i in wanted}):
        with open(settings.work("sources", shard, ".jsonl"), encoding="utf-8") as f:
            for row, line in enumerate(f):
                if (shard << 32) | row in wanted:
                    sources[(shard << 32) | row] = json.loads(line)
    lines: dict[str, list[str]] = defaultdict(list)
    for i in dropped:
        domain = _domain(metas, i, settings)
        lines[domain].append(json.dumps({"source": sources[i], "duplicate_of": sources[roots[i]]}) + "\n")
    for domain, rows in lines.items():
        path = settings.root / "rejects" / f"{domain}.dedup.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(rows), encoding="utf-8")
