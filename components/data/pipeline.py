"""The data pipeline: sources -> clean -> dedup -> split -> train BPE -> tokenize -> store -> mix -> load.

`TextPipeline` is what a recipe puts in `data=`. Preparation runs once per fingerprint (the
repr of every source, filter and setting, plus the Python version, whose stdlib is the
default corpus) into `{data_dir}/{fingerprint}/`; a second run with the same config loads
the cached store in seconds, any config change prepares anew. Every stage reports, per
domain, documents and bytes in and out (and tokens), so nothing is dropped uncounted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from components.data.dedup import Deduplicator
from components.data.document import Document
from components.data.loader import PackedLoader
from components.data.mixture import mixture_weights
from components.data.sources.files import LocalFiles
from components.data.store import TokenStore, write_store
from components.data.tokenizer import encode_documents, load_encoding, named_encoding, train_bpe
from components.interfaces import DataSource, DocumentFilter, TrainingData
from registry.invariants import invariant

FORMAT_VERSION = 1


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


def _nbytes(docs: list[Document]) -> int:
    return sum(len(d.text.encode("utf-8", "replace")) for d in docs)


@invariant("0 < val_fraction < 1", lambda val_fraction: 0 < val_fraction < 1, fix="hold out e.g. 0.02 of the documents")
@invariant("mixture_temperature > 0", lambda mixture_temperature: mixture_temperature > 0, fix="use a temperature > 0")
class TextPipeline(TrainingData):
    """Multi-domain text -> packed token sequences, prepared once and cached.

    Args:
        sources: the `DataSource`s; each yields the documents of its `domain`.
        filters: domain -> cleaning filters applied in order ("*" for domains not listed).
        dedup: exact + near-duplicate removal within each domain (None: skip).
        vocab_size: ids of the trained byte-level BPE (256 bytes + merges + 4 special tokens).
        encoding_name: use this standard tiktoken encoding (e.g. "cl100k_base") instead of
            training one; it must be available locally (tiktoken downloads on first use), and
            vocab_size must cover it.
        tokenizer_sample_bytes: at most this much training-split text trains the BPE.
        mixture_temperature, mixture_weights: domain sampling (see `mixture_weights`).
        val_fraction: documents held out for validation (chosen by content hash).
        data_dir: where prepared data is cached. rejects: also write rejected documents to
            `rejects/{domain}.{filter}.jsonl` for inspection. workers: tiktoken encoding threads
            (the deduplicator has its own `workers` processes).
    """

    def __init__(self, *, sources: list[DataSource], filters: dict[str, list[DocumentFilter]] | None = None,
                 dedup: Deduplicator | None = None, vocab_size: int = 2048, tokenizer_sample_bytes: int = 20_000_000,
                 mixture_temperature: float = 1.0, mixture_weights: dict[str, float] | None = None,
                 val_fraction: float = 0.02, data_dir: str = "runs/data", rejects: bool = False, workers: int = 2,
                 progress: bool = True, encoding_name: str | None = None):
        self.sources = sources
        self.filters = filters or {}
        self.dedup = dedup
        self.vocab_size = vocab_size
        self.tokenizer_sample_bytes = tokenizer_sample_bytes
        self.mixture_temperature = mixture_temperature
        self.explicit_weights = mixture_weights
        self.val_fraction = val_fraction
        self.data_dir = Path(data_dir)
        self.rejects = rejects
        self.workers = workers
        self.progress = progress
        self.encoding_name = encoding_name
        for source in sources:
            if isinstance(source, LocalFiles) and source.cache_dir is None:
                source.cache_dir = str(self.data_dir / "hf_cache")
        self._store: TokenStore | None = None
        self._report: list[StageRow] | None = None
        self._loaders: dict[str, PackedLoader] = {}

    # -- identity and caching -----------------------------------------------------------------
    def fingerprint(self) -> str:
        sources = [dataclasses.replace(s, cache_dir=None) if isinstance(s, LocalFiles) else s for s in self.sources]
        spec = repr((FORMAT_VERSION, sys.version, sources, sorted(self.filters.items()), self.dedup, self.vocab_size,
                     self.tokenizer_sample_bytes, self.val_fraction, self.encoding_name))
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    @property
    def folder(self) -> Path:
        return self.data_dir / self.fingerprint()

    def prepared(self) -> bool:
        """Whether a prepared copy with this fingerprint exists (prepare() would only load it)."""
        return (self.folder / "report.json").exists()

    def prepare(self, *, force: bool = False, console: Console | None = None) -> list[StageRow]:
        """Run the pipeline unless a prepared copy with this fingerprint exists; returns the report."""
        folder = self.folder
        if not force and self.prepared():
            self._report = [StageRow(**row) for row in json.loads((folder / "report.json").read_text())]
            self._store = TokenStore(folder / "tokens")
            return self._report
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        report = self._run(tmp, console or Console())
        (tmp / "report.json").write_text(json.dumps([dataclasses.asdict(r) for r in report], indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: a crash mid-preparation never leaves a half-written cache
        self._report = report
        self._store = TokenStore(folder / "tokens")
        self._loaders = {}  # loaders of a previous preparation read deleted files
        return report

    # -- the stages ------------------------------------------------------------------------------
    def _run(self, folder: Path, console: Console) -> list[StageRow]:
        report: list[StageRow] = []
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not self.progress) as bar:
            docs = self._collect(report, bar)
            docs = self._clean(docs, report, bar, folder)
            if self.dedup is not None:
                docs = self._deduplicate(docs, report, bar)
            splits = self._split(docs, report)
            task = bar.add_task("train tokenizer", total=1)
            if self.encoding_name is not None:
                encoding = named_encoding(self.encoding_name)
                if encoding.n_vocab > self.vocab_size:
                    raise ValueError(f"encoding {self.encoding_name!r} has {encoding.n_vocab} ids but vocab_size is "
                                     f"{self.vocab_size}; set vocab_size (and model.vocab_size) >= {encoding.n_vocab}")
            else:
                encoding = train_bpe(self._tokenizer_sample(splits), vocab_size=self.vocab_size,
                                     folder=folder / "tokenizer")
            bar.advance(task)
            task = bar.add_task("tokenize", total=len(splits))
            arrays = {}
            for (domain, split), ds in sorted(splits.items()):
                arrays[(domain, split)] = encode_documents(encoding, [d.text for d in ds], threads=self.workers)
                n_tokens = sum(len(t) + 1 for t in arrays[(domain, split)])
                report.append(StageRow(f"tokenize ({split})", domain, len(ds), len(ds), _nbytes(ds), _nbytes(ds),
                                       tokens=n_tokens, note=f"{_nbytes(ds) / max(1, n_tokens):.2f} bytes/token"))
                bar.advance(task)
            eos = encoding.eot_token if self.encoding_name is not None else encoding._special_tokens["<|eos|>"]
            write_store(folder / "tokens", arrays, eos=eos, vocab_size=self.vocab_size)
        return report

    def _tokenizer_sample(self, splits: dict[tuple[str, str], list[Document]]) -> list[str]:
        """Training-split texts for the BPE: an equal byte budget per domain, so a large domain
        (code) does not crowd the others out of the vocabulary."""
        domains = sorted({domain for domain, split in splits if split == "train"})
        budget = self.tokenizer_sample_bytes // max(1, len(domains))
        sample = []
        for domain in domains:
            size = 0
            for doc in splits[(domain, "train")]:
                if size >= budget:
                    break
                sample.append(doc.text)
                size += len(doc.text.encode("utf-8", "replace"))
        return sample

    def _collect(self, report: list[StageRow], bar: Progress) -> list[Document]:
        docs: list[Document] = []
        task = bar.add_task("collect", total=len(self.sources))
        for source in self.sources:
            found = list(source.documents())
            if not found:
                raise ValueError(f"data source {source!r} produced no documents; check its path or settings")
            invalid = sum(d.invalid_utf8 for d in found)
            report.append(StageRow("collect", source.domain, len(found), len(found), _nbytes(found), _nbytes(found),
                                   note=f"{invalid} with invalid UTF-8 (replaced)" if invalid else ""))
            docs.extend(found)
            bar.advance(task)
        return docs

    def _clean(self, docs: list[Document], report: list[StageRow], bar: Progress, folder: Path) -> list[Document]:
        by_domain: dict[str, list[Document]] = defaultdict(list)
        for doc in docs:
            by_domain[doc.domain].append(doc)
        kept_all: list[Document] = []
        task = bar.add_task("clean", total=len(docs))
        for domain, current in sorted(by_domain.items()):
            for flt in self.filters.get(domain, self.filters.get("*", [])):
                kept, rejected = [], []
                for doc in current:
                    out = flt.process(doc)
                    (kept if out is not None else rejected).append(out if out is not None else doc)
                report.append(StageRow(f"clean: {flt.name}", domain, len(current), len(kept), _nbytes(current),
                                       _nbytes(kept)))
                if self.rejects and rejected:
                    path = folder / "rejects" / f"{domain}.{flt.name}.jsonl"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("".join(json.dumps({"source": d.source, "text": d.text}) + "\n" for d in rejected))
                if not kept:
                    raise ValueError(f"filter {flt.name} ({flt!r}) removed every remaining document of domain "
                                     f"{domain!r} ({len(current)}); loosen its thresholds for this domain")
                current = kept
            kept_all.extend(current)
            bar.advance(task, len(by_domain[domain]))
        return kept_all

    def _deduplicate(self, docs: list[Document], report: list[StageRow], bar: Progress) -> list[Document]:
        by_domain: dict[str, list[Document]] = defaultdict(list)
        for doc in docs:
            by_domain[doc.domain].append(doc)
        kept_all = []
        task = bar.add_task("dedup", total=len(by_domain))
        for domain, current in sorted(by_domain.items()):
            result = self.dedup(current)
            report.append(StageRow("dedup", domain, len(current), len(result.kept), _nbytes(current),
                                   _nbytes(result.kept), note=f"{result.exact_removed} exact, {result.near_removed} "
                                                              f"near-duplicate in {result.clusters} clusters"))
            kept_all.extend(result.kept)
            bar.advance(task)
        return kept_all

    def _split(self, docs: list[Document], report: list[StageRow]) -> dict[tuple[str, str], list[Document]]:
        splits: dict[tuple[str, str], list[Document]] = defaultdict(list)
        for doc in docs:
            held_out = int(doc.key[:8], 16) / 16**8 < self.val_fraction
            splits[(doc.domain, "val" if held_out else "train")].append(doc)
        for domain in sorted({d.domain for d in docs}):
            train, val = splits[(domain, "train")], splits[(domain, "val")]
            if len(train) + len(val) < 2:
                raise ValueError(f"domain {domain!r} has {len(train) + len(val)} document(s) after cleaning; it needs "
                                 f"at least 2 (one for training, one held out): give it more documents")
            # A small domain can hash entirely to one side: move the document nearest the cut.
            if not val:
                val.append(train.pop(min(range(len(train)), key=lambda i: train[i].key)))
            if not train:
                train.append(val.pop(max(range(len(val)), key=lambda i: val[i].key)))
        return splits

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

    def loader(self, split: str, *, batch_size: int, seq_len: int, seed: int) -> PackedLoader:
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        weights = self.weights() if split == "train" else {d: 1.0 for d in self.store.domains(split)}
        return PackedLoader(store=self.store, split=split, seq_len=seq_len, batch_size=batch_size, weights=weights,
                            seed=seed, rank=rank, world_size=world)

    def batch(self, split: str, *, batch_size: int, seq_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        seed = generator.initial_seed() + (split == "val")
        # One stream per split, sequence length and seed (a new seed, a new run: a new stream); its
        # position does not depend on the batch size or the number of ranks reading it.
        key = f"{split}:{seq_len}:{seed}"
        if key not in self._loaders:
            self._loaders[key] = self.loader(split, batch_size=batch_size, seq_len=seq_len, seed=seed)
        return self._loaders[key].next_batch(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Positions of every loader created so far (save with a checkpoint)."""
        return {key: loader.state_dict() for key, loader in self._loaders.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, loader_state in state.items():
            parts = key.split(":")  # split:seq_len:seed (older checkpoints: split:batch:seq_len:seed)
            split, seq_len, seed = parts[0], parts[-2], parts[-1]
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

