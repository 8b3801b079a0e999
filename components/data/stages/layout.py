"""What the stages share: the preparation's settings and where each task's files go.

Under the preparation folder:

    shards.json                       the input shards [source index, shard name], by task rank
    work/docs/NNNNN.jsonl.zst         cleaned documents of input shard NNNNN (text, domain, source)
    work/meta/NNNNN.bin               per document: content key, domain id, UTF-8 bytes (`META`)
    work/sigs/NNNNN.bin, bands/...    MinHash signatures [n, num_perm] uint32, band hashes
                                      [n, num_bands] uint64 (raw rows, appended batch by batch)
    work/pairs/BBB.PPP.npy            verified near-duplicate pairs of band BBB, hash range PPP
    work/drop/NNNNN.npy               sorted indices of shard NNNNN's documents to drop
    stats/STAGE/NNNNN.json            what each task did (summed into report.json)
    stats/split.json                  documents moved across the train / validation cut
    logs/STAGE/                       the engine's task logs and completion marks
    tokenizer/, tokens/               the results (tokens/DOMAIN.SPLIT.NNNNN.bin, index.json)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

META = np.dtype([("key", "<u8"), ("domain", "<u2"), ("nbytes", "<u4")])
"""One row per cleaned document: the top 64 bits of its SHA-1 content key, its domain's
index in `Settings.domains`, its UTF-8 size."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a task needs, pickled to the workers (sources, filters, dedup are the
    pipeline's own configured objects)."""

    folder: str
    sources: list[Any]
    filters: dict[str, list[Any]]
    dedup: Any
    strict: bool
    rejects: bool
    val_fraction: float
    vocab_size: int
    encoding_name: str | None
    tokenizer_sample_bytes: int
    partitions: int = 1
    """Hash ranges each LSH band's bucketing is split into, so one bucket task holds at most
    a bounded slice of the corpus's band hashes."""

    @property
    def root(self) -> Path:
        return Path(self.folder)

    @property
    def domains(self) -> list[str]:
        return sorted({s.domain for s in self.sources})

    def shards(self) -> list[tuple[int, str]]:
        """The input shards by task rank (written once by the driver)."""
        return [tuple(s) for s in json.loads((self.root / "shards.json").read_text())]

    def work(self, kind: str, rank: int, suffix: str) -> Path:
        return self.root / "work" / kind / f"{rank:05d}{suffix}"


def held_out(key: np.ndarray | int, fraction: float) -> np.ndarray | bool:
    """Whether a document with 64-bit content key `key` belongs to the validation split: the
    key's top 32 bits, read as a fraction of 2^32, fall below `fraction`."""
    return (np.asarray(key, dtype=np.uint64) >> np.uint64(32)) / 2.0**32 < fraction


def content_key(hex_digest: str) -> int:
    """The 64-bit key of a document from its SHA-1 hex digest (`Document.key`)."""
    return int(hex_digest[:16], 16)


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON atomically (a killed task never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> None:
    """`np.save` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


ROWS = {"meta": (META, 1), "sigs": (np.dtype(np.uint32), 0), "bands": (np.dtype(np.uint64), 0)}
"""The row files a clean task appends to: dtype, and row width (0: set by the dedup settings)."""


def row_width(settings: Settings, kind: str) -> int:
    dtype, width = ROWS[kind]
    return width or (settings.dedup.num_perm if kind == "sigs" else settings.dedup.num_bands)


def read_rows(settings: Settings, kind: str, shard: int) -> np.ndarray:
    """Shard `shard`'s `kind` rows ("meta", "sigs", "bands"), memory-mapped: [n] or [n, width]."""
    dtype, _ = ROWS[kind]
    path, width = settings.work(kind, shard, ".bin"), row_width(settings, kind)
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros((0, width) if kind != "meta" else 0, dtype=dtype)
    rows = np.memmap(path, dtype=dtype, mode="r")
    return rows if kind == "meta" else rows.reshape(-1, width)


def stats_path(settings: Settings, stage: str, rank: int) -> Path:
    return settings.root / "stats" / stage / f"{rank:05d}.json"


def read_stats(settings: Settings, stage: str) -> list[dict]:
    """Every task's stats of `stage`, by rank."""
    folder = settings.root / "stats" / stage
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


class TaskStep(PipelineStep):
    """A stage's one datatrove pipeline step: it ignores the input stream and does its task's
    work from files (`run_task(rank, world_size)`); datatrove times it and marks the task
    complete after it returns."""

    type = "tessera"

    def __init__(self, *, settings: Settings):
        super().__init__()
        self.settings = settings

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        with self.track_time(unit="task"):
            self.run_task(rank, world_size)

    def run_task(self, rank: int, world_size: int) -> None:
        raise NotImplementedError
