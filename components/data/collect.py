"""Malformed rows in reports and errors: where they are listed, how they are summed up.

Malformed rows (see `tessera.components.data.sources.rows`) are written, one JSON object per
line, to `rejects/{domain}.malformed.jsonl` in the prepared folder and summed up per file in
the collect stage's report note; in strict mode the first one stops preparation with its
file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from tessera.components.data.sources.rows import MalformedRowError

SHOWN_FILES = 4  # files named in a report note; the rejects file lists every row


def rejects_file(folder: Path, domain: str) -> Path:
    """Where the malformed rows of `domain` are written, under a prepared folder."""
    return folder / "rejects" / f"{domain}.malformed.jsonl"


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


def malformed_note(per_file: Mapping[str, int], root: str | None = None) -> str:
    """'3 malformed rows skipped (a.jsonl 2, b.parquet 1)': rows per file, most first; file
    names relative to `root` when they are under it."""
    counts: Counter[str] = Counter()
    for file, rows in per_file.items():
        counts[_short(file, root)] += rows
    total = sum(counts.values())
    shown = ", ".join(f"{name} {count}" for name, count in counts.most_common(SHOWN_FILES))
    more = f", +{len(counts) - SHOWN_FILES} more files" if len(counts) > SHOWN_FILES else ""
    return f"{total} malformed row{'s' * (total != 1)} skipped ({shown}{more})"


def _short(file: str, root: str | None) -> str:
    if root is None:
        return file
    try:
        relative = Path(file).relative_to(Path(root).expanduser())
    except ValueError:
        return file
    return str(relative) if str(relative) != "." else Path(file).name
