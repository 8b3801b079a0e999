"""Documents from local files (txt, jsonl, json, parquet) and from Hugging Face hub datasets."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tessera.components.data.document import Document
from tessera.components.data.sources.readers import SUFFIXES, TxtSplit, file_format, read_rows
from tessera.components.data.sources.rows import MalformedRow, RowSource
from tessera.registry.kinds import DATA_SOURCE


@DATA_SOURCE.register("local_files")
@dataclasses.dataclass(kw_only=True)
class LocalFiles(RowSource):
    """Every corpus file under `path` (a file or a folder, searched recursively, hidden files
    and folders skipped), in sorted order. Read here, never over the network.

    txt: one document per file, or per paragraph / line with `txt_split` (invalid UTF-8
    replaced and counted); jsonl: one per line, the
    text in `text_field`; json: an array of such objects, or JSON Lines; parquet: one per row
    of column `text_field`. `.gz` files are decompressed (not parquet, compressed inside).
    Rows that cannot be used (broken JSON, a missing, non-string or empty text, a row over
    `max_row_bytes`) come out of `rows()` as `MalformedRow`s naming file and line.
    `format` restricts which files are read.
    """

    path: str
    domain: str
    text_field: str = "text"
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    max_row_bytes: int = 16_000_000
    txt_split: TxtSplit = "file"

    def files(self) -> list[Path]:
        """The files read, sorted; raises FileNotFoundError when there are none."""
        root = Path(self.path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"local_files source {self.domain!r}: {root} does not exist (path={self.path!r}); "
                                    f"give a txt / jsonl / parquet file or a folder of them")
        if root.is_file():
            if file_format(root) is None:
                raise FileNotFoundError(f"local_files source {self.domain!r}: {root} is not a "
                                        f"{' / '.join(s[1:] for s in SUFFIXES)} file (optionally .gz)")
            return [root]
        files = sorted(p for p in root.rglob("*") if p.is_file() and file_format(p) is not None
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if self.format != "auto":
            wanted = {"txt": {".txt"}, "jsonl": {".jsonl", ".json"}, "parquet": {".parquet"}}[self.format]
            files = [f for f in files if file_format(f) in wanted]
        if not files:
            raise FileNotFoundError(f"local_files source {self.domain!r}: no txt/jsonl/parquet files under {root}")
        return files

    def rows(self) -> Iterator[Document | MalformedRow]:
        for file in self.files():
            yield from read_rows(file, domain=self.domain, text_field=self.text_field,
                                 max_row_bytes=self.max_row_bytes, txt_split=self.txt_split)

    def content_signature(self) -> str:
        """A hash of every file's absolute path, size and modification time: a file edited,
        added or removed (or the same relative path from another folder) changes it."""
        digest = hashlib.sha256()
        for file in self.files():
            stat = file.stat()
            digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


@DATA_SOURCE.register("hub_dataset")
@dataclasses.dataclass(kw_only=True)
class HubDataset(RowSource):
    """A Hugging Face hub dataset, streamed with `datasets` (needs network): `name`, optional
    `config`, `split`, the `text_field`, and at most `max_documents` rows. Rows without a
    string text are reported as malformed (`name:split:row`)."""

    name: str
    domain: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int = 100_000

    def rows(self) -> Iterator[Document | MalformedRow]:
        import datasets

        rows = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        for i, row in enumerate(rows):
            if i >= self.max_documents:
                return
            where = f"{self.name}:{self.split}:{i}"
            text = row.get(self.text_field)
            if isinstance(text, str) and text.strip():
                yield Document(text=text, domain=self.domain, source=where)
            else:
                problem = "missing" if text is None else "empty" if isinstance(text, str) else \
                    f"a {type(text).__name__}, not a string"
                yield MalformedRow(file=self.name, where=where, line=i,
                                   reason=f"field {self.text_field!r} is {problem}")
