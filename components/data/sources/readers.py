"""Row readers for local corpus files: txt, JSON Lines, JSON arrays, parquet (the first three
optionally .gz or .zst) and the Arrow files of a folder written by `datasets`' `save_to_disk`.

Each reader yields `Document`s and, for rows it cannot use, `MalformedRow`s that say where
(file and 1-based line, or parquet / arrow row) and why. No reader ever raises on bad content:
a file that cannot be read at all becomes one `MalformedRow` for the whole file, and a
compressed or Arrow file that breaks off part way (truncated, corrupt) one `MalformedRow` for
the rest of it, after the rows read so far. JSON Lines is read line by line here rather than
through `datasets`/pyarrow, whose JSON readers stop at the first bad line without naming it; a
line over `max_row_bytes` is skipped without being held in memory whole.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Literal

from tessera.components.data.document import Document, decode
from tessera.components.data.sources.rows import MalformedRow

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
"""Formats read (each also as `NAME.gz` or `NAME.zst`, except parquet, which compresses internally)."""

COMPRESSIONS = (".gz", ".zst")
"""Whole-file compressions undone while reading (gzip, Zstandard)."""

ARROW = ".arrow"
"""Arrow IPC files, read as the data of a `save_to_disk` folder (see `files.LocalFiles`)."""

TxtSplit = Literal["file", "paragraph", "line"]

_EXCERPT = 200  # characters of a bad row kept in the rejects file
_CHUNK = 1 << 20  # bytes read at a time when skipping an oversized line
_ZSTD_IN = 1 << 16  # compressed bytes decompressed at a time: text expands ~3-10x, so ~0.5 MiB out
_BATCH = 1024  # rows of an Arrow column turned into Python strings at a time


def file_format(path: Path) -> str | None:
    """".txt" / ".jsonl" / ".json" / ".parquet" / ".arrow" for a readable file name (the first
    three also under .gz / .zst), else None."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            inner = name.removesuffix(compression)
            return next((s for s in SUFFIXES if s != ".parquet" and inner.endswith(s)), None)
    if name.endswith(ARROW):
        return ARROW
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def read_rows(path: Path, *, domain: str, text_field: str, max_row_bytes: int,
              txt_split: TxtSplit = "file") -> Iterator[Document | MalformedRow]:
    """Every row of `path`: txt is one document per file (`txt_split="file"`), per paragraph
    ("paragraph": runs of lines between blank lines) or per non-blank line ("line"); JSON Lines
    one per line; a JSON file holding an array one per item; parquet and Arrow one per row of
    column `text_field`. A compressed or Arrow file that turns out corrupt part way ends with
    one `MalformedRow` for the rest of it instead of raising."""
    fmt = file_format(path)
    if fmt is None:
        raise ValueError(f"{path}: not a txt / jsonl / json / parquet file (optionally .gz or .zst) "
                         f"nor the {ARROW} file of a save_to_disk folder")
    if fmt == ARROW:
        import pyarrow as pa

        # an Arrow IPC stream that breaks off raises ArrowInvalid (or OSError) from the batch reader
        return _until_unreadable(path, _arrow(path, domain, text_field, max_row_bytes),
                                 (pa.ArrowException, OSError), "an Arrow IPC file")
    rows = _by_format(path, fmt, domain, text_field, max_row_bytes, txt_split)
    compression = _compression(path)
    if compression is None:
        return rows
    return _until_unreadable(path, rows, _decompression_errors(compression),
                             f"{'gzip' if compression == '.gz' else 'Zstandard'} data")


def _by_format(path: Path, fmt: str, domain: str, field: str, limit: int,
               txt_split: TxtSplit) -> Iterator[Document | MalformedRow]:
    """The rows of a txt / JSON / parquet file, by the reader for its format."""
    if fmt == ".txt" and txt_split != "file":
        yield from _txt_pieces(path, domain, limit, by_line=txt_split == "line")
    elif fmt == ".txt":
        yield from _txt(path, domain, limit)
    elif fmt == ".parquet":
        yield from _parquet(path, domain, field, limit)
    elif fmt == ".json" and _starts_with_array(path):
        yield from _json_array(path, domain, field, limit)
    else:
        yield from _json_lines(path, domain, field, limit)


def _compression(path: Path) -> str | None:
    return next((c for c in COMPRESSIONS if path.name.lower().endswith(c)), None)


def _decompression_errors(compression: str) -> tuple[type[BaseException], ...]:
    """What reading a damaged file of this compression raises: gzip raises EOFError when
    truncated, BadGzipFile (an OSError) or zlib.error when corrupt; zstandard its ZstdError
    (and `_ZstdFrames` EOFError when truncated)."""
    if compression == ".gz":
        return EOFError, OSError, zlib.error
    return EOFError, OSError, _zstandard().ZstdError


def _zstandard() -> ModuleType:
    """The `zstandard` package, imported only when a .zst file is read."""
    try:
        import zstandard
    except ImportError as err:
        raise ImportError("reading .zst files needs the zstandard package: pip install 'zstandard>=0.22'") from err
    return zstandard


def _until_unreadable(path: Path, rows: Iterable[Document | MalformedRow], errors: tuple[type[BaseException], ...],
                      what: str) -> Iterator[Document | MalformedRow]:
    """`rows`, until reading the file raises one of `errors`: then one `MalformedRow` standing
    for the rest of the file (all of it when nothing was read), so a damaged file is counted
    with its name instead of stopping the preparation with a traceback."""
    read = 0
    try:
        for row in rows:
            read += 1
            yield row
    except errors as err:
        rest = "the file is skipped" if read == 0 else f"after {read:,} rows, the rest of the file is skipped"
        yield MalformedRow(file=str(path), where=str(path),
                           reason=f"not readable as {what} (corrupt or truncated: "
                                  f"{str(err) or type(err).__name__}); {rest}")


def _open(path: Path) -> IO[bytes]:
    compression = _compression(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        # buffered, so that readline(limit) (and read(n)) work as on a plain file
        return io.BufferedReader(_ZstdFrames(open(path, "rb")), buffer_size=_ZSTD_IN)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a Zstandard file of one or more frames (as `zstd` writes, or
    several concatenated), decompressed 64 KiB of input at a time.

    Not `zstandard`'s own `stream_reader`: that ends quietly where a truncated file ends, so a
    download cut short would pass for a complete file; here input that ends inside a frame
    raises EOFError, as gzip does.
    """

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self._raw = raw
        self._decompressor = _zstandard().ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # whether input was given to the current frame and it has not ended
        self._out = b""
        self._at = 0  # bytes of `_out` already handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while self._at == len(self._out):
            data = self._raw.read(_ZSTD_IN)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a Zstandard frame")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        """The output of `data`, starting a new frame wherever one ends."""
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._in_frame = True
            if not self._frame.eof:
                break
            data = self._frame.unused_data  # the start of the next frame, if any
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


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


def _column_problem(schema: pa.Schema, field: str) -> str | None:
    """Why an Arrow schema (parquet's or an Arrow file's) has no text column `field`, or None."""
    import pyarrow as pa

    if field not in schema.names:
        columns = ", ".join(map(repr, schema.names[:8]))
        return f"no column {field!r} (columns: {columns}); set text_field to the text column"
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        return f"column {field!r} holds {kind}, not strings; set text_field to the text column"
    return None


def _text_rows(path: Path, texts: Iterable[list[str | None]], domain: str, field: str,
               limit: int) -> Iterator[Document | MalformedRow]:
    """One document per value of a text column, given in batches; rows numbered from 1 over
    all batches ("file:row N"); null, blank and oversized values are malformed rows."""
    row = 0
    for batch in texts:
        for text in batch:
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


def _parquet(path: Path, domain: str, field: str, limit: int) -> Iterator[Document | MalformedRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        yield MalformedRow(file=str(path), where=str(path), rows=0, reason=f"not a readable parquet file ({err})")
        return
    problem = _column_problem(pf.schema_arrow, field)
    if problem is not None:
        yield MalformedRow(file=str(path), where=str(path), rows=pf.metadata.num_rows, reason=problem)
        return
    batches = pf.iter_batches(columns=[field], batch_size=_BATCH)
    yield from _text_rows(path, (batch.column(0).to_pylist() for batch in batches), domain, field, limit)


def _arrow(path: Path, domain: str, field: str, limit: int) -> Iterator[Document | MalformedRow]:
    """The rows of an Arrow IPC file, batch by batch from a memory map, so a large file is
    never held in memory. `datasets` writes the stream format; the file format is read too."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        schema, batches = _arrow_batches(source)
        problem = _column_problem(schema, field)
        if problem is not None:  # the whole file stands for all of its rows, as in parquet
            yield MalformedRow(file=str(path), where=str(path), rows=sum(b.num_rows for b in batches()),
                               reason=problem)
            return
        texts = (batch.column(field).slice(start, _BATCH).to_pylist()
                 for batch in batches() for start in range(0, batch.num_rows, _BATCH))
        yield from _text_rows(path, texts, domain, field, limit)


def _arrow_batches(source: pa.MemoryMappedFile) -> tuple[pa.Schema, Callable[[], Iterator[pa.RecordBatch]]]:
    """The schema of an Arrow IPC stream or file and a function iterating its record batches."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        stream = ipc.open_stream(source)
    except pa.ArrowInvalid:  # not the stream format: the random-access file format, or no Arrow at all
        source.seek(0)
        reader = ipc.open_file(source)
        return reader.schema, lambda: (reader.get_batch(i) for i in range(reader.num_record_batches))
    return stream.schema, lambda: iter(stream)
