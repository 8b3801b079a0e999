"""Rows a source could not turn into a document, and the sources that report them.

A corpus someone else wrote has bad rows: broken JSON, a missing or non-string text field,
empty or oversized rows. A `RowSource` yields those as `MalformedRow`s next to its documents,
so the pipeline can skip and count them per file (and write them to a rejects file), or, in
strict mode, stop at the first one with its file and line.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator

from tessera.components.data.document import Document
from tessera.components.interfaces import DataSource


@dataclasses.dataclass(frozen=True)
class MalformedRow:
    """One unreadable row (or, with `line=None`, a whole unreadable file).

    `where` is what a user opens: "corpus/a.jsonl:17" (a line), "corpus/b.parquet:row 3" (a
    parquet row), "corpus/c.parquet" (the whole file). `rows` is how many rows it stands for
    (a file without the text column stands for all of its rows); `excerpt` is the start of
    the raw row for the rejects file, `nbytes` the raw row's size.
    """

    file: str
    where: str
    reason: str
    line: int | None = None
    excerpt: str = ""
    rows: int = 1
    nbytes: int = 0

    def record(self) -> dict:
        """The row's line in the rejects file."""
        return {"where": self.where, "file": self.file, "line": self.line, "reason": self.reason, "rows": self.rows,
                "bytes": self.nbytes, "excerpt": self.excerpt}


class MalformedRowError(ValueError):
    """Raised in strict mode at the first malformed row; the message starts with file:line."""


class RowSource(DataSource):
    """A `DataSource` that also reports the rows it skipped.

    `rows()` yields `Document`s and `MalformedRow`s in file order; `documents()` is its
    documents only (for users of the plain `DataSource` interface). `content_signature()`
    changes when what the source reads changes without its repr changing (files edited in
    place), so a prepared cache keyed on it is never served stale.
    """

    @abc.abstractmethod
    def rows(self) -> Iterator[Document | MalformedRow]: ...

    def documents(self) -> Iterator[Document]:
        for row in self.rows():
            if isinstance(row, Document):
                yield row

    def content_signature(self) -> str:
        return ""

    def shards(self) -> list[str]:
        """Names of the pieces this source can be read in independently (a corpus folder's
        files); the preparation reads each in its own task. One piece by default."""
        return ["all"]

    def shard_rows(self, shard: str) -> Iterator[Document | MalformedRow]:
        """The rows of one of `shards()`, in order (their concatenation over `shards()` is `rows()`)."""
        if shard != "all":
            raise ValueError(f"{type(self).__name__} has one shard, 'all'; got {shard!r}")
        return self.rows()
