"""The data pipeline: sources -> clean -> dedup -> split -> train BPE -> tokenize -> store -> mix -> load.

`TextPipeline` is what a recipe puts in `data=`; `path=` points it at a user's own corpus
instead of its sources. Preparation runs once per fingerprint (the repr of every source,
filter and setting, each source's content signature (local files' paths, sizes and
modification times), plus the Python version, whose stdlib is the default corpus) into
`{data_dir}/{fingerprint}/`; a second run with the same config and files loads the cached
store in seconds, any change prepares anew. The preparation streams over shards on a
`DataEngine` (see `tessera.components.data.stages`): memory is bounded by a shard, never the
corpus. Every stage reports, per domain, documents and bytes in and out (and tokens), and
rows that could not be read are counted per file, so nothing is dropped uncounted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tessera.components.data.collect import first_malformed, rejects_file
from tessera.components.data.dedup import Deduplicator
from tessera.components.data.engine import LocalEngine
from tessera.components.data.loader import PackedLoader
from tessera.components.data.mixture import mixture_weights
from tessera.components.data.preparation import band_partitions, preparation_lock, prepare_into
from tessera.components.data.sources.files import HubDataset, LocalFiles
from tessera.components.data.sources.readers import TxtSplit
from tessera.components.data.sources.rows import RowSource
from tessera.components.data.stages.layout import Settings
from tessera.components.data.store import TokenStore
from tessera.components.data.tokenizer import encoding_identity, load_encoding, named_encoding
from tessera.components.interfaces import (
    BytesPerToken,
    DataEngine,
    DataShare,
    DataSource,
    DocumentFilter,
    HasTokenizer,
    PreparedData,
    ShardedData,
    StatefulData,
    TrainingData,
)
from tessera.registry.invariants import invariant

FORMAT_VERSION = 3  # 2: EOS is tiktoken's <|endoftext|>; malformed rows are counted; 3: sharded token files
OWN_DOMAIN = "text"  # the domain of a corpus given by `path`
HUB_PREFIX = "hub:"  # path="hub:NAME" streams a Hugging Face hub dataset


@dataclasses.dataclass
class StageRow:
    """One line of the report: what a stage did to one domain."""

    stage: str
    domain: str
    docs_in: int
    docs_out: int
    bytes_in: int
    bytes_out: int
    tokens: int | None = None
    note: str = ""
    malformed: int = 0
    """Rows the source could not read (collect stage only); docs_in counts them, docs_out not."""


@invariant("0 < val_fraction < 1", lambda val_fraction: 0 < val_fraction < 1, fix="hold out e.g. 0.02 of the documents")
@invariant("mixture_temperature > 0", lambda mixture_temperature: mixture_temperature > 0, fix="use a temperature > 0")
class TextPipeline(TrainingData, StatefulData, ShardedData, PreparedData, BytesPerToken, HasTokenizer):
    """Multi-domain text -> packed token sequences, prepared once and cached.

    Args:
        sources: the `DataSource`s; each yields the documents of its `domain`.
        path: your own corpus instead of `sources`: a txt / jsonl / json / parquet file (also
            .gz / .zst) or a folder of them or one written by `datasets`' `save_to_disk` (see
            `LocalFiles`), or "hub:NAME" for a Hugging Face hub dataset (streamed; needs the
            network), read as the one domain "text".
        text_field: the jsonl field / parquet column holding the text (with `path`).
        txt_split: a txt file is one document ("file"), one per paragraph ("paragraph": between
            blank lines) or one per non-blank line ("line") (with `path`).
        strict: stop at the first malformed row (broken JSON, missing / non-string / empty
            text, a row over the reader's size limit) with its file and line; by default such
            rows are skipped, counted per file in the report and listed in
            `rejects/{domain}.malformed.jsonl` of the prepared folder.
        filters: domain -> cleaning filters applied in order ("*" for domains not listed).
        dedup: exact + near-duplicate removal within each domain (None: skip).
        vocab_size: ids of the trained byte-level BPE (256 bytes + merges + 4 special tokens).
        encoding_name: use this standard tiktoken encoding (e.g. "cl100k_base") instead of
            training one; it must be available locally (tiktoken downloads on first use), and
            vocab_size must cover it. "hf:PATH": a checkpoint's own tokenizer.json (or its
            folder), converted exactly or refused (see `hf_tokenizer`).
        tokenizer_sample_bytes: at most this much training-split text trains the BPE.
        mixture_temperature, mixture_weights: domain sampling (see `mixture_weights`).
        val_fraction: documents held out for validation (chosen by content hash).
        data_dir: where prepared data is cached. rejects: also write rejected documents to
            `rejects/{domain}.{filter}.jsonl` (and dropped duplicates, with the document kept in
            their place, to `rejects/{domain}.dedup.jsonl`) for inspection.
        engine: where the preparation's sharded stages run (`LocalEngine(workers=N)` by
            default; `RayEngine`, `SlurmEngine` for a cluster); the prepared data is the same on
            any engine, so it is not part of the fingerprint.
    """

    def __init__(self, *, sources: list[DataSource] | None = None, path: str | None = None, text_field: str = "text",
                 txt_split: TxtSplit = "file", strict: bool = False,
                 filters: dict[str, list[DocumentFilter]] | None = None,
                 dedup: Deduplicator | None = None, vocab_size: int = 2048, tokenizer_sample_bytes: int = 20_000_000,
                 mixture_temperature: float = 1.0, mixture_weights: dict[str, float] | None = None,
                 val_fraction: float = 0.02, data_dir: str = "runs/data", rejects: bool = False,
                 engine: DataEngine | None = None, progress: bool = True, encoding_name: str | None = None):
        if path is not None and path.startswith(HUB_PREFIX):
            sources = [HubDataset(name=path.removeprefix(HUB_PREFIX), domain=OWN_DOMAIN, text_field=text_field)]
        elif path is not None:  # the user's own corpus replaces the preset's sources
            sources = [LocalFiles(path=path, domain=OWN_DOMAIN, text_field=text_field, txt_split=txt_split)]
        if not sources:
            raise ValueError("TextPipeline needs sources=[...] or path=<a corpus file or folder>")
        self.sources = sources
        self.path = path
        self.strict = strict
        self.filters = filters or {}
        self.dedup = dedup
        self.vocab_size = vocab_size
        self.tokenizer_sample_bytes = tokenizer_sample_bytes
        self.mixture_temperature = mixture_temperature
        self.explicit_weights = mixture_weights
        self.val_fraction = val_fraction
        self.data_dir = Path(data_dir)
        self.rejects = rejects
        self.engine = engine or LocalEngine()
        self.progress = progress
        self.encoding_name = encoding_name
        self._store: TokenStore | None = None
        self._fingerprint: str | None = None
        self._report: list[StageRow] | None = None
        self._loaders: dict[str, PackedLoader] = {}
        self._share = DataShare(0, 1)

    # -- identity and caching -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """The cache key (computed once per instance: it walks a corpus folder's files)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        contents = [s.content_signature() if isinstance(s, RowSource) else "" for s in self.sources]
        spec = repr((FORMAT_VERSION, sys.version, self.sources, contents, sorted(self.filters.items()), self.dedup,
                     self.vocab_size, self.tokenizer_sample_bytes, self.val_fraction,
                     encoding_identity(self.encoding_name)))
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    @property
    def folder(self) -> Path:
        return self.data_dir / self.fingerprint()

    def prepared(self) -> bool:
        """Whether a prepared copy with this fingerprint exists (prepare() would only load it)."""
        return (self.folder / "report.json").exists()

    def prepare(self, *, force: bool = False, console: Console | None = None) -> list[StageRow]:
        """Run the pipeline unless a prepared copy with this fingerprint exists; returns the report.

        A preparation cut short continues from its finished shards; a second process asking
        for the same fingerprint meanwhile waits for the first and loads its result."""
        folder = self.folder
        console = console or Console()
        with preparation_lock(folder, console):
            if not force and self.prepared():
                return self._load(folder, console)
            tmp = folder.with_name(folder.name + ".tmp")
            if force:
                shutil.rmtree(tmp, ignore_errors=True)
            prepare_into(self._settings(tmp), self.engine, console=console, progress=self.progress)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)  # atomic: the cache is whole or absent
        self._loaders = {}  # loaders of a previous preparation read deleted files
        return self._load(folder, console, cached=False)

    def _load(self, folder: Path, console: Console, *, cached: bool = True) -> list[StageRow]:
        self._report = [StageRow(**row) for row in json.loads((folder / "report.json").read_text())]
        self._store = TokenStore(folder / "tokens")
        if self.strict and cached:  # a copy prepared leniently still holds the rows strict mode refuses
            bad = [r.domain for r in self._report if r.stage == "collect" and r.malformed]
            if bad:
                raise first_malformed(folder, bad[0])
        if self.progress:
            console.print(self.summary(cached=cached), highlight=False, soft_wrap=True)
        return self._report

    def _settings(self, folder: Path) -> Settings:
        if self.encoding_name is not None:
            encoding = named_encoding(self.encoding_name)
            if encoding.n_vocab > self.vocab_size:
                raise ValueError(f"encoding {self.encoding_name!r} has {encoding.n_vocab} ids but vocab_size is "
                                 f"{self.vocab_size}; set vocab_size (and model.vocab_size) >= {encoding.n_vocab}")
        return Settings(folder=str(folder), sources=self.sources, filters=self.filters, dedup=self.dedup,
                        strict=self.strict, rejects=self.rejects, val_fraction=self.val_fraction,
                        vocab_size=self.vocab_size, encoding_name=self.encoding_name,
                        tokenizer_sample_bytes=self.tokenizer_sample_bytes, partitions=band_partitions(self.sources))

    def summary(self, *, cached: bool) -> str:
        """One line on what preparation read, kept and skipped (printed by `prepare`)."""
        rows = self._report or []
        collected = [r for r in rows if r.stage == "collect"]
        tokenized = [r for r in rows if r.stage.startswith("tokenize")]
        malformed = sum(r.malformed for r in collected)
        line = (f"data: {'loaded' if cached else 'prepared'} {self.folder}: {sum(r.docs_in for r in collected):,} rows "
                f"read, {sum(r.docs_out for r in tokenized):,} documents kept "
                f"({sum(r.tokens or 0 for r in tokenized):,} tokens)")
        if malformed:
            domains = sorted({r.domain for r in collected if r.malformed})
            where = ", ".join(str(rejects_file(self.folder, d)) for d in domains)
            notes = "; ".join(r.note for r in collected if r.malformed)
            line += f"; {notes}; listed in {where}"
        else:
            line += "; 0 malformed rows"
        return line

    # -- reading ---------------------------------------------------------------------------------
    @property
    def store(self) -> TokenStore:
        if self._store is None:
            self.prepare()
        return self._store

    def weights(self) -> dict[str, float]:
        """The effective mixture over the training split's domains (by token counts)."""
        sizes = {d: self.store.size(d, "train") for d in self.store.domains("train")}
        return mixture_weights(sizes, temperature=self.mixture_temperature, explicit=self.explicit_weights)

    def bytes_per_token(self, split: str) -> float:
        """Mean UTF-8 bytes per token of `split` (for bits per byte), from the tokenize report."""
        rows = [r for r in (self._report or self.prepare()) if r.stage == f"tokenize ({split})"]
        return sum(r.bytes_out for r in rows) / max(1, sum(r.tokens or 0 for r in rows))

    def encoding(self):
        """The trained tiktoken encoding."""
        if self.encoding_name is not None:
            return named_encoding(self.encoding_name)
        return load_encoding(self.folder / "tokenizer")

    def read_share(self, share: DataShare) -> None:
        """Read share `share.rank` of `share.size` of every batch from now on: the loaders
        hand the processes disjoint sequences of one stream. Set it before the first batch (a
        loader keeps the share it was created with)."""
        if self._loaders and share != self._share:
            raise RuntimeError(f"data: the share {tuple(share)} comes after batches were read as "
                               f"{tuple(self._share)}; call read_share before the first batch")
        self._share = share

    def loader(self, split: str, *, batch_size: int, seq_len: int, seed: int) -> PackedLoader:
        weights = self.weights() if split == "train" else {d: 1.0 for d in self.store.domains(split)}
        return PackedLoader(store=self.store, split=split, seq_len=seq_len, batch_size=batch_size, weights=weights,
                            seed=seed, rank=self._share.rank, world_size=self._share.size)

    def batch(self, split: str, *, batch_size: int, seq_len: int,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
        seed = generator.initial_seed() + (split == "val")
        # One stream per split, sequence length and seed (a new seed, a new run: a new stream); its
        # position does not depend on the batch size or the number of ranks reading it.
        key = f"{split}:{seq_len}:{seed}"
        if key not in self._loaders:
            self._loaders[key] = self.loader(split, batch_size=batch_size, seq_len=seq_len, seed=seed)
        return self._loaders[key].next_batch(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Positions of every training loader created so far (save with a checkpoint). The
        validation stream is left out: a run reads its validation sample once from the
        stream's start, so a resumed run must start it afresh to read the same sample."""
        return {key: loader.state_dict() for key, loader in self._loaders.items() if not key.startswith("val:")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, loader_state in state.items():
            parts = key.split(":")  # split:seq_len:seed (older checkpoints: split:batch:seq_len:seed)
            split, seq_len, seed = parts[0], parts[-2], parts[-1]
            if split == "val":  # older checkpoints saved it; see state_dict
                continue
            key = f"{split}:{seq_len}:{seed}"
            if key not in self._loaders:
                self._loaders[key] = self.loader(split, batch_size=1, seq_len=int(seq_len), seed=int(seed))
            self._loaders[key].load_state_dict(loader_state)

    def report_table(self) -> Table:
        """The per-stage report as a rich table (prepares first if needed)."""
        rows = self._report if self._report is not None else self.prepare()
        table = Table(title=f"data pipeline {self.fingerprint()} ({self.folder})")
        for col in ("stage", "domain", "docs in", "docs out", "MB in", "MB out", "tokens", "note"):
            table.add_column(col, justify="right" if col not in ("stage", "domain", "note") else "left")
        for r in rows:
            table.add_row(r.stage, r.domain, f"{r.docs_in:,}", f"{r.docs_out:,}", f"{r.bytes_in / 1e6:.2f}",
                          f"{r.bytes_out / 1e6:.2f}", f"{r.tokens:,}" if r.tokens is not None else "", r.note)
        weights = self.weights()
        table.caption = "mixture (train): " + ", ".join(f"{d} {p:.1%}" for d, p in weights.items())
        return table

