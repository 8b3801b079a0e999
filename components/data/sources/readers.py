"""Row readers for local corpus files: txt, JSON Lines, JSON arrays and parquet (optionally .gz).

Each reader yields `Document`s and, for rows it cannot use, `MalformedRow`s that say where
(file and 1-based line, or parquet row) and why. No reader ever raises on bad content: a
file that cannot be read at all becomes one `MalformedRow` for the whole file. JSON Lines is
read line by line here rather than through `datasets`/pyarrow, whose JSON readers stop at the
first bad line without naming it; a line over `max_row_bytes` is skipped without being held
in memory whole.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from tessera.components.data.document import Document, decode
from tessera.components.data.sources.rows import MalformedRow

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
"""Formats read (each also as `NAME.gz`, except parquet, which compresses internally)."""

TxtSplit = Literal["file", "paragraph", "line"]

_EXCERPT = 200  # characters of a bad row kept in the rejects file
_CHUNK = 1 << 20  # bytes read at a time when skipping an oversized line


def file_format(path: Path) -> str | None:
    """".txt" / ".jsonl" / ".json" / ".parquet" for a readable file name, else None."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
        return next((s for s in SUFFIXES if s != ".parquet" and name.endswith(s)), None)
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def read_rows(path: Path, *, domain: str, text_field: str, max_row_bytes: int,
              txt_split: TxtSplit = "file") -> Iterator[Document | MalformedRow]:
    """Every row of `path`: txt is one document per file (`txt_split="file"`), per paragraph
    ("paragraph": runs of lines between blank lines) or per non-blank line ("line"); JSON Lines
    one per line; a JSON file holding an array one per item; parquet one per row of column
    `text_field`."""
    fmt = file_format(path)
    if fmt == ".txt" and txt_split != "file":
        yield from _txt_pieces(path, domain, max_row_bytes, by_line=txt_split == "line")
    elif fmt == ".txt":
        yield from _txt(path, domain, max_row_bytes)
    elif fmt == ".parquet":
        yield from _parquet(path, domain, text_field, max_row_bytes)
    elif fmt == ".json" and _starts_with_array(path):
        yield from _json_array(path, domain, text_field, max_row_bytes)
    elif fmt in (".jsonl", ".json"):
        yield from _json_lines(path, domain, text_field, max_row_bytes)
    else:
        raise ValueError(f"{path}: not a txt / jsonl / json / parquet file")


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _too_big(size: int, limit: int) -> str:
    return f"row of {size:,} bytes is over max_row_bytes={limit:,} (raise the limit, or split the document)"


def _txt(path: Path, domain: str, limit: int) -> Iterator[Document | MalformedRow]:
    with _open(path) as f:
        data = f.read(limit + 1)
        size = len(data) + (_to_end(f) if len(data) > limit else 0)
    if size > limit:
        yield MalformedRow(file=str(path), where=str(path), reason=_too_big(size, limit),
                           excerpt=decode(data[:_EXCERPT * 4])[0][:_EXCERPT], nbytes=size)
        return
    text, replaced = decode(data)
    if not text.strip():
        yield MalformedRow(file=str(path), where=str(path), reason="empty file", excerpt=text[:_EXCERPT], nbytes=size)
        return
    yield Document(text=text, domain=domain, source=str(path), invalid_utf8=replaced)


def _txt_pieces(path: Path, domain: str, limit: int, *, by_line: bool) -> Iterator[Document | MalformedRow]:
    """Paragraphs (or non-blank lines) of a text file, streamed; each located by its first
    line. A piece over `limit` bytes is counted to its end but never held whole."""
    held: list[bytes] = []
    start = size = 0

    def flush() -> Iterator[Document | MalformedRow]:
        where = f"{path}:{start}"
        if size > limit:
            yield MalformedRow(file=str(path), where=where, line=start, reason=_too_big(size, limit), nbytes=size,
                               excerpt=decode(held[0][:_EXCERPT * 4])[0][:_EXCERPT])
        elif held:
            text, replaced = decode(b"".join(held).rstrip(b"\r\n"))
            yield Document(text=text, domain=domain, source=where, invalid_utf8=replaced)

    with _open(path) as f:
        line = 0
        while raw := f.readline(limit + 1):
            line += 1
            n = len(raw)
            if n > limit and not raw.endswith(b"\n"):
                n += _skip(f)  # the rest of an oversized line: counted, not held
            elif not raw.strip():  # a blank line ends a paragraph
                yield from flush()
                held, size = [], 0
                continue
            if size == 0:
                start = line
            if size + n <= limit or not held:
                held.append(raw)  # (a first line over the limit is held only as far as read, for the excerpt)
            size += n
            if by_line:
                yield from flush()
                held, size = [], 0
        yield from flush()


def _to_end(f: IO[bytes]) -> int:
    """Read to the end of the file in chunks; returns the bytes skipped."""
    skipped = 0
    while chunk := f.read(_CHUNK):
        skipped += len(chunk)
    return skipped


def _skip(f: IO[bytes]) -> int:
    """Read to the end of the current line (or file) in chunks; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = f.readline(_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _json_lines(path: Path, domain: str, field: str, limit: int) -> Iterator[Document | MalformedRow]:
    with _open(path) as f:
        line = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            line += 1
            where = f"{path}:{line}"
            if len(raw.rstrip(b"\r\n")) > limit:
                size = len(raw) + (0 if raw.endswith(b"\n") else _skip(f))
                yield MalformedRow(file=str(path), where=where, line=line, reason=_too_big(size, limit),
                                   excerpt=decode(raw[:_EXCERPT * 4])[0][:_EXCERPT], nbytes=size)
                continue
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing between records) carry no row
            text, replaced = decode(raw.rstrip(b"\r\n"))
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                yield MalformedRow(file=str(path), where=where, line=line, nbytes=len(raw),
                                   reason=f"malformed JSON: {err.msg.removesuffix(' at')} at column {err.colno}",
                                   excerpt=text.strip()[:_EXCERPT])
                continue
            yield _row(value, field, domain, path=path, where=where, line=line, nbytes=len(raw), replaced=replaced,
                       raw=text)


def _starts_with_array(path: Path) -> bool:
    with _open(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _json_array(path: Path, domain: str, field: str, limit: int) -> Iterator[Document | MalformedRow]:
    with _open(path) as f:
        data = f.read()
    text, replaced = decode(data)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        yield MalformedRow(file=str(path), where=f"{path}:{err.lineno}", line=err.lineno, nbytes=len(data),
                           reason=f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno}); the whole "
                                  f"file is skipped (JSON Lines files lose only the bad line)",
                           excerpt=text[max(0, err.pos - _EXCERPT // 2): err.pos + _EXCERPT // 2])
        return
    for i, value in enumerate(items, start=1):
        size = len(json.dumps(value).encode()) if isinstance(value, (dict, list)) else len(str(value))
        where = f"{path}:item {i}"
        if size > limit:
            yield MalformedRow(file=str(path), where=where, reason=_too_big(size, limit), nbytes=size)
            continue
        yield _row(value, field, domain, path=path, where=where, line=None, nbytes=size, replaced=replaced, raw=None)


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _row(value: object, field: str, domain: str, *, path: Path, where: str, line: int | None, nbytes: int,
         replaced: bool, raw: str | None) -> Document | MalformedRow:
    """The document in one parsed JSON row, or why there is none."""
    excerpt = (raw.strip() if raw is not None else json.dumps(value))[:_EXCERPT]

    def bad(reason: str) -> MalformedRow:
        return MalformedRow(file=str(path), where=where, line=line, reason=reason, excerpt=excerpt, nbytes=nbytes)

    if not isinstance(value, dict):
        return bad(f"row is {_kind(value)}, not an object with a {field!r} field")
    if field not in value:
        fields = ", ".join(map(repr, list(value)[:8])) or "none"
        return bad(f"no {field!r} field (fields: {fields}); set text_field to the field holding the text")
    text = value[field]
    if not isinstance(text, str):
        return bad(f"field {field!r} is {_kind(text)}, not a string")
    if not text.strip():
        return bad(f"field {field!r} is empty")
    return Document(text=text, domain=domain, source=where, invalid_utf8=replaced)


def _parquet(path: Path, domain: str, field: str, limit: int) -> Iterator[Document | MalformedRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        yield MalformedRow(file=str(path), where=str(path), rows=0, reason=f"not a readable parquet file ({err})")
        return
    schema, n_rows = pf.schema_arrow, pf.metadata.num_rows
    if field not in schema.names:
        columns = ", ".join(map(repr, schema.names[:8]))
        yield MalformedRow(file=str(path), where=str(path), rows=n_rows,
                           reason=f"no column {field!r} (columns: {columns}); set text_field to the text column")
        return
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        yield MalformedRow(file=str(path), where=str(path), rows=n_rows,
                           reason=f"column {field!r} holds {kind}, not strings; set text_field to the text column")
        return
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            if text is None:
                yield MalformedRow(file=str(path), where=where, line=row, reason=f"column {field!r} is null")
                continue
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                yield MalformedRow(file=str(path), where=where, line=row, reason=_too_big(size, limit),
                                   excerpt=text[:_EXCERPT], nbytes=size)
            elif not text.strip():
                yield MalformedRow(file=str(path), where=where, line=row, reason=f"column {field!r} is empty",
                                   nbytes=size)
            else:
                yield Document(text=text, domain=domain, source=where)
