"""The pipeline's first stage: read one source, skipping and counting malformed rows per file.

Malformed rows (see `tessera.components.data.sources.rows`) are written, one JSON object per line, to
`rejects/{domain}.malformed.jsonl` in the prepared folder and summed up per file in the
stage's report note; in strict mode the first one stops preparation with its file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tessera.components.data.document import Document
from tessera.components.data.sources.rows import MalformedRow, MalformedRowError, RowSource
from tessera.components.interfaces import DataSource

SHOWN_FILES = 4  # files named in a report note; the rejects file lists every row


def rejects_file(folder: Path, domain: str) -> Path:
    """Where the malformed rows of `domain` are written, under a prepared folder."""
    return folder / "rejects" / f"{domain}.malformed.jsonl"


def collect(source: DataSource, *, strict: bool, folder: Path) -> tuple[list[Document], list[MalformedRow]]:
    """The documents of `source` and the malformed rows it skipped (appended to the domain's
    rejects file under `folder`). With `strict`, raises `MalformedRowError` at the first one."""
    docs: list[Document] = []
    malformed: list[MalformedRow] = []
    for row in source.rows() if isinstance(source, RowSource) else source.documents():
        if isinstance(row, Document):
            docs.append(row)
            continue
        if strict:
            raise strict_error(row.where, row.reason, source.domain)
        malformed.append(row)
    if malformed:
        path = rejects_file(folder, source.domain)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row.record(), ensure_ascii=False) + "\n" for row in malformed)
    return docs, malformed


def strict_error(where: str, reason: str, domain: str) -> MalformedRowError:
    """The strict mode's error for a malformed row at `where`."""
    return MalformedRowError(
        f"{where}: {reason}. Fix or remove this row; or run without strict mode (data.strict=False, the "
        f"default), which skips malformed rows, counts them per file and lists them in "
        f"rejects/{domain}.malformed.jsonl of the prepared data folder")


def first_malformed(folder: Path, domain: str) -> MalformedRowError:
    """The strict mode's error for the first row in a prepared folder's rejects file (a copy
    prepared without strict mode, now loaded with it)."""
    with rejects_file(folder, domain).open(encoding="utf-8") as f:
        first = json.loads(f.readline())
    return strict_error(first["where"], first["reason"], domain)


def malformed_note(malformed: list[MalformedRow], root: str | None = None) -> str:
    """'3 malformed rows skipped (a.jsonl 2, b.parquet 1)': counts per file, most first; file
    names relative to `root` when they are under it."""
    per_file: Counter[str] = Counter()
    for row in malformed:
        per_file[_short(row.file, root)] += row.rows
    total = sum(per_file.values())
    shown = ", ".join(f"{name} {count}" for name, count in per_file.most_common(SHOWN_FILES))
    more = f", +{len(per_file) - SHOWN_FILES} more files" if len(per_file) > SHOWN_FILES else ""
    return f"{total} malformed row{'s' * (total != 1)} skipped ({shown}{more})"


def _short(file: str, root: str | None) -> str:
    if root is None:
        return file
    try:
        relative = Path(file).relative_to(Path(root).expanduser())
    except ValueError:
        return file
    return str(relative) if str(relative) != "." else Path(file).name
