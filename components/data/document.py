"""The unit the data pipeline moves: one document of one domain."""

from __future__ import annotations

import dataclasses
import hashlib


@dataclasses.dataclass(frozen=True)
class Document:
    """A text document. `source` says where it came from (a path, a dataset row) for reports."""

    text: str
    domain: str
    source: str = ""
    invalid_utf8: bool = False
    """True when the raw bytes were not valid UTF-8 and were decoded with replacement characters."""

    def replace_text(self, text: str) -> Document:
        return dataclasses.replace(self, text=text)

    @property
    def key(self) -> str:
        """Stable content hash (the train/validation split and exact dedup use it)."""
        return hashlib.sha1(self.text.encode("utf-8", "surrogatepass")).hexdigest()


def decode(data: bytes) -> tuple[str, bool]:
    """UTF-8 text of `data`, with invalid bytes replaced; the flag says whether any were."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True
