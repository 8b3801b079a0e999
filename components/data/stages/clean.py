"""Stage 1, one task per input shard: read -> count malformed rows -> filters -> signatures.

Writes, for input shard NNNNN: the kept documents' UTF-8 texts back to back
(`work/docs/NNNNN.zst`, zstd), where each came from (`work/sources/NNNNN.jsonl`), their
`META` rows, and with dedup their MinHash signatures and LSH band hashes. Documents are
handled in batches of `BATCH_BYTES`, each appended to the files as it is done, so a task
holds one batch, whatever the size of its shard or the corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import IO

import numpy as np

from tessera.components.data.collect import strict_error
from tessera.components.data.document import Document
from tessera.components.data.minhash import band_hashes, signatures
from tessera.components.data.sources.rows import MalformedRow, RowSource
from tessera.components.data.stages.layout import META, TaskStep, stats_path, write_json

BATCH_BYTES = 8 << 20  # kept documents signed and written at a time
FILTER_CHARS = 1 << 20  # documents read before they go through the filters together
EXAMPLES = 3  # malformed rows quoted in the error when a source yields no document


class _Writer:
    """The task's outputs, appended batch by batch under temporary names and renamed when
    the task ends (a killed task leaves no file that looks finished)."""

    def __init__(self, settings, rank: int, *, dedup: bool):
        import zstandard

        names = {"docs": ".zst", "sources": ".jsonl", "meta": ".bin", **({"sigs": ".bin", "bands": ".bin"} if dedup
                                                                           else {})}
        self.paths = {name: settings.work(name, rank, suffix) for name, suffix in names.items()}
        self.files = {}
        for name, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files[name] = open(self._tmp(name), "wb")
        self.docs = zstandard.ZstdCompressor(level=1).stream_writer(self.files["docs"])

    def _tmp(self, name: str) -> Path:
        return self.paths[name].with_name(self.paths[name].name + ".tmp")

    def write(self, name: str, data: bytes) -> None:
        (self.docs if name == "docs" else self.files[name]).write(data)

    def close(self) -> None:
        self.docs.close()  # also closes the docs file
        for name, f in self.files.items():
            f.close()
            self._tmp(name).replace(self.paths[name])


class CleanStep(TaskStep):
    """Read one input shard, clean it, and sign the kept documents (see module docstring)."""

    name = "clean"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        index, shard = s.shards()[rank]
        self._rank = rank
        source = s.sources[index]
        domain = source.domain
        self._chain = s.filters.get(domain, s.filters.get("*", []))
        self._stats = {"source": index, "domain": domain, "rows": 0, "docs": 0, "bytes_in": 0, "bytes": 0,
                       "invalid_utf8": 0, "malformed": 0, "malformed_files": Counter(), "examples": [],
                       "error": None, "filters": [[f.name, 0, 0, 0, 0] for f in self._chain]}
        self._lines: dict[str, IO[str]] = {}  # rejects files, opened on first use
        writer = _Writer(s, rank, dedup=s.dedup is not None)
        self._kept = self._kept_bytes = 0
        batch: list[tuple[str, bytes, str]] = []  # kept documents: text, UTF-8 bytes, source
        pending: list[Document] = []  # read, not yet through the filters
        size = pending_chars = 0
        rows = source.shard_rows(shard) if isinstance(source, RowSource) else source.documents()
        for row in itertools.chain(rows, [None]):  # None: the end, where the last batches go
            if isinstance(row, MalformedRow):
                if self._malformed_row(row, domain):
                    break
                continue
            if row is not None:
                pending.append(row)
                pending_chars += len(row.text)
                if pending_chars < FILTER_CHARS:
                    continue
            for kept in self._clean(pending):
                batch.append(kept)
                size += len(kept[1])
            pending, pending_chars = [], 0
            if size >= BATCH_BYTES or row is None:
                self._flush(batch, writer, s.domains.index(domain))
                batch, size = [], 0
        writer.close()
        self._finish(rank, domain)

    def _malformed_row(self, row: MalformedRow, domain: str) -> bool:
        """Count a malformed row; True when strict mode stops the task."""
        st = self._stats
        if self.settings.strict:
            st["error"] = str(strict_error(row.where, row.reason, domain))
            return True
        st["rows"] += row.rows
        st["malformed"] += row.rows
        st["bytes_in"] += row.nbytes
        st["malformed_files"][row.file] += row.rows
        if len(st["examples"]) < EXAMPLES:
            st["examples"].append(f"{row.where}: {row.reason}")
        self._reject("malformed", json.dumps(row.record(), ensure_ascii=False))
        return False

    def _clean(self, docs: list[Document]) -> list[tuple[str, bytes, str]]:
        """`docs` through the domain's filters, a batch at a time, counted per filter: the
        survivors' (text, UTF-8 bytes, source)."""
        st = self._stats
        data = [doc.text.encode("utf-8", "surrogatepass") for doc in docs]
        total = sum(map(len, data))
        st["rows"] += len(docs)
        st["docs"] += len(docs)
        st["bytes_in"] += total
        st["bytes"] += total
        st["invalid_utf8"] += sum(doc.invalid_utf8 for doc in docs)
        docs, alive = list(docs), list(range(len(docs)))
        for flt, counts in zip(self._chain, st["filters"]):
            counts[1] += len(alive)
            counts[3] += sum(len(data[i]) for i in alive)
            survivors = []
            for i, out in zip(alive, flt.process_batch([docs[i] for i in alive])):
                if out is None:
                    if self.settings.rejects:
                        self._reject(flt.name, json.dumps({"source": docs[i].source, "text": docs[i].text}))
                    continue
                if out.text is not docs[i].text:
                    data[i] = out.text.encode("utf-8", "surrogatepass")
                docs[i] = out
                survivors.append(i)
            counts[2] += len(survivors)
            counts[4] += sum(len(data[i]) for i in survivors)
            alive = survivors
        return [(docs[i].text, data[i], docs[i].source) for i in alive]

    def _flush(self, batch: list[tuple[str, bytes, str]], writer: _Writer, domain_id: int) -> None:
        if not batch:
            return
        meta = np.zeros(len(batch), dtype=META)
        meta["key"] = [int(hashlib.sha1(data).hexdigest()[:16], 16) for _, data, _ in batch]
        meta["domain"] = domain_id
        meta["nbytes"] = [len(data) for _, data, _ in batch]
        self._kept += len(batch)
        self._kept_bytes += int(meta["nbytes"].sum())
        writer.write("meta", meta.tobytes())
        # one write per batch: zstd's per-call cost is larger than its per-byte cost for documents
        writer.write("docs", b"".join(data for _, data, _ in batch))
        writer.write("sources", "".join(json.dumps(source) + "\n" for _, _, source in batch).encode())
        dedup = self.settings.dedup
        if dedup is not None:
            sigs = signatures([text for text, _, _ in batch], shingle=dedup.shingle, num_perm=dedup.num_perm,
                              seed=dedup.seed).astype(np.uint32, copy=False)
            writer.write("sigs", sigs.tobytes())
            writer.write("bands", band_hashes(sigs, dedup.num_bands).astype(np.uint64, copy=False).tobytes())

    def _reject(self, name: str, line: str) -> None:
        """Append a line to this task's `rejects/DOMAIN.NAME.NNNNN.jsonl`."""
        if name not in self._lines:
            path = self.settings.root / "rejects" / f"{self._stats['domain']}.{name}.{self._rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lines[name] = open(path, "w", encoding="utf-8")
        self._lines[name].write(line + "\n")

    def _finish(self, rank: int, domain: str) -> None:
        s = self.settings
        for f in self._lines.values():
            f.close()
        self._stats["kept"] = self._kept
        self._stats["kept_bytes"] = self._kept_bytes
        write_json(stats_path(s, "clean", rank), self._stats)
