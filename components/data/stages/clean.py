"""Stage 1, one task per input shard: read -> count malformed rows -> filters -> signatures.

Writes, for input shard NNNNN: the kept documents' UTF-8 texts back to back
(`work/docs/NNNNN.zst`, zstd), where each came from (`work/sources/NNNNN.jsonl`), their
`META` rows, and with dedup their MinHash signatures and LSH band hashes. Documents are
handled in batches of `BATCH_BYTES`, so a task's memory is one batch plus the shard's
signatures (num_perm x 4 bytes per document), whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tessera.components.data.collect import strict_error
from tessera.components.data.document import Document
from tessera.components.data.minhash import band_hashes, signatures
from tessera.components.data.sources.rows import MalformedRow, RowSource
from tessera.components.data.stages.layout import META, TaskStep, save_array, stats_path, write_json

BATCH_BYTES = 8 << 20
EXAMPLES = 3  # malformed rows quoted in the error when a source yields no document


class _Writer:
    """The task's outputs, written under temporary names and renamed when the task ends."""

    def __init__(self, paths: dict[str, Path]):
        import zstandard

        self.paths = paths
        for path in paths.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open(self._tmp("docs"), "wb")
        self.docs = zstandard.ZstdCompressor(level=1).stream_writer(self._raw)
        self.sources = open(self._tmp("sources"), "w", encoding="utf-8")

    def _tmp(self, name: str) -> Path:
        return self.paths[name].with_name(self.paths[name].name + ".tmp")

    def close(self) -> None:
        self.docs.close()  # also closes the raw file
        self.sources.close()
        for name in ("docs", "sources"):
            self._tmp(name).replace(self.paths[name])


class CleanStep(TaskStep):
    """Read one input shard, clean it, and sign the kept documents (see module docstring)."""

    name = "clean"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        index, shard = s.shards()[rank]
        source = s.sources[index]
        domain = source.domain
        self._chain = s.filters.get(domain, s.filters.get("*", []))
        self._stats = {"source": index, "domain": domain, "rows": 0, "docs": 0, "bytes_in": 0, "bytes": 0,
                       "invalid_utf8": 0, "malformed": 0, "malformed_files": Counter(), "examples": [],
                       "error": None, "filters": [[f.name, 0, 0, 0, 0] for f in self._chain]}
        self._rejected: dict[str, list[str]] = {}
        self._malformed: list[str] = []
        writer = _Writer({k: s.work(k, rank, ext) for k, ext in (("docs", ".zst"), ("sources", ".jsonl"))})
        batch: list[tuple[str, bytes, str]] = []
        size = 0
        self._meta, self._sigs = [], []
        rows = source.shard_rows(shard) if isinstance(source, RowSource) else source.documents()
        for row in rows:
            if isinstance(row, MalformedRow):
                if self._malformed_row(row, domain):
                    break
                continue
            doc = self._clean(row)
            if doc is None:
                continue
            data = doc.text.encode("utf-8", "surrogatepass")
            batch.append((doc.text, data, doc.source))
            size += len(data)
            if size >= BATCH_BYTES:
                self._flush(batch, writer, s.domains.index(domain))
                batch, size = [], 0
        self._flush(batch, writer, s.domains.index(domain))
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
        self._malformed.append(json.dumps(row.record(), ensure_ascii=False))
        return False

    def _clean(self, doc: Document) -> Document | None:
        """`doc` through the domain's filters, counted per filter; None when one rejects it."""
        st = self._stats
        nbytes = len(doc.text.encode("utf-8", "surrogatepass"))
        st["rows"] += 1
        st["docs"] += 1
        st["bytes_in"] += nbytes
        st["bytes"] += nbytes
        st["invalid_utf8"] += doc.invalid_utf8
        for flt, counts in zip(self._chain, st["filters"]):
            counts[1] += 1
            counts[3] += nbytes
            out = flt.process(doc)
            if out is None:
                if self.settings.rejects:
                    self._rejected.setdefault(flt.name, []).append(json.dumps({"source": doc.source,
                                                                               "text": doc.text}))
                return None
            if out.text is not doc.text:
                nbytes = len(out.text.encode("utf-8", "surrogatepass"))
            counts[2] += 1
            counts[4] += nbytes
            doc = out
        return doc

    def _flush(self, batch: list[tuple[str, bytes, str]], writer: _Writer, domain_id: int) -> None:
        if not batch:
            return
        meta = np.zeros(len(batch), dtype=META)
        meta["key"] = [int(hashlib.sha1(data).hexdigest()[:16], 16) for _, data, _ in batch]
        meta["domain"] = domain_id
        meta["nbytes"] = [len(data) for _, data, _ in batch]
        self._meta.append(meta)
        for _, data, source in batch:
            writer.docs.write(data)
            writer.sources.write(json.dumps(source) + "\n")
        dedup = self.settings.dedup
        if dedup is not None:
            self._sigs.append(signatures([text for text, _, _ in batch], shingle=dedup.shingle,
                                         num_perm=dedup.num_perm, seed=dedup.seed))

    def _finish(self, rank: int, domain: str) -> None:
        s = self.settings
        meta = np.concatenate(self._meta) if self._meta else np.zeros(0, dtype=META)
        if s.dedup is not None:
            sigs = np.concatenate(self._sigs) if self._sigs else np.zeros((0, s.dedup.num_perm), dtype=np.uint32)
            save_array(s.work("sigs", rank, ".npy"), sigs)
            save_array(s.work("bands", rank, ".npy"), np.ascontiguousarray(band_hashes(sigs, s.dedup.num_bands).T))
        save_array(s.work("meta", rank, ".npy"), meta)
        _write_lines(s.root / "rejects" / f"{domain}.malformed.{rank:05d}.jsonl", self._malformed)
        for name, lines in self._rejected.items():
            _write_lines(s.root / "rejects" / f"{domain}.{name}.{rank:05d}.jsonl", lines)
        self._stats["kept"] = int(meta.size)
        self._stats["kept_bytes"] = int(meta["nbytes"].sum())
        write_json(stats_path(s, "clean", rank), self._stats)


def _write_lines(path: Path, lines: list[Any]) -> None:
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
