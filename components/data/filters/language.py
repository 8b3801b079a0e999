"""Language identification with py3langid (its model ships inside the package: works offline)."""

from __future__ import annotations

import dataclasses

from tessera.components.data.document import Document
from tessera.components.interfaces import DocumentFilter
from tessera.registry.kinds import DATA_FILTER


@DATA_FILTER.register("language")
@dataclasses.dataclass(kw_only=True)
class LanguageFilter(DocumentFilter):
    """Keeps documents whose identified language is in `languages` (ISO 639-1 codes), judged
    on the first `sample_chars` characters."""

    languages: list[str] = dataclasses.field(default_factory=lambda: ["en"])
    sample_chars: int = 2000

    def identify(self, text: str) -> str:
        import py3langid

        return py3langid.classify(text[: self.sample_chars])[0]

    def process(self, doc: Document) -> Document | None:
        return doc if self.identify(doc.text) in self.languages else None
