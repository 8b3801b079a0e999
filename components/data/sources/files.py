"""Documents from local files (txt, jsonl, parquet) and from Hugging Face hub datasets, via `datasets`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from components.data.document import Document, decode
from components.interfaces import DataSource
from registry.kinds import DATA_SOURCE

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@DATA_SOURCE.register("local_files")
@dataclasses.dataclass(kw_only=True)
class LocalFiles(DataSource):
    """Every matching file under `path` (a file or a folder), one document per row.

    txt: one document per file (invalid UTF-8 replaced and counted); jsonl / parquet: one per
    row, text in `text_field`, read with `datasets`. `cache_dir` is where `datasets`
    keeps its Arrow cache (the pipeline points it into the run's data folder, never the
    user's home cache by surprise).
    """

    path: str
    domain: str
    text_field: str = "text"
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    cache_dir: str | None = None

    def _files(self) -> list[Path]:
        root = Path(self.path)
        if not root.exists():
            raise FileNotFoundError(f"local_files source {self.domain!r}: {root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in _BUILDERS)
        if self.format != "auto":
            wanted = {"txt": {".txt"}, "jsonl": {".jsonl", ".json"}, "parquet": {".parquet"}}[self.format]
            files = [f for f in files if f.suffix in wanted]
        if not files:
            raise FileNotFoundError(f"local_files source {self.domain!r}: no txt/jsonl/parquet files under {root}")
        return files

    def documents(self) -> Iterator[Document]:
        import datasets

        for file in self._files():
            builder = _BUILDERS.get(file.suffix, "text")
            if builder == "text":  # read directly: invalid UTF-8 is replaced and counted, not an error
                text, replaced = decode(file.read_bytes())
                yield Document(text=text, domain=self.domain, source=str(file), invalid_utf8=replaced)
                continue
            rows = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=self.cache_dir)
            field = self.text_field
            if field not in rows.column_names:
                raise KeyError(f"{file}: no column {field!r} (columns: {rows.column_names}); set text_field")
            for i, text in enumerate(rows[field]):
                if isinstance(text, str):
                    yield Document(text=text, domain=self.domain, source=f"{file}:{i}")


@DATA_SOURCE.register("hub_dataset")
@dataclasses.dataclass(kw_only=True)
class HubDataset(DataSource):
    """A Hugging Face hub dataset, streamed (needs network): `name`, optional `config`, `split`,
    the `text_field`, and at most `max_documents` rows."""

    name: str
    domain: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int = 100_000

    def documents(self) -> Iterator[Document]:
        import datasets

        rows = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        for i, row in enumerate(rows):
            if i >= self.max_documents:
                return
            text = row.get(self.text_field)
            if isinstance(text, str):
                yield Document(text=text, domain=self.domain, source=f"{self.name}:{i}")
