"""Rule-based cleaning: regex line cleaning, length, symbol, repetition (Gopher/C4-style for
prose) and code-shape (StarCoder-style) filters. Thresholds are per-instance, so each domain
gets its own: web heuristics would destroy code and documentation."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from tessera.components.data.document import Document
from tessera.components.interfaces import DocumentFilter
from tessera.registry.kinds import DATA_FILTER

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@DATA_FILTER.register("regex_clean")
@dataclasses.dataclass(kw_only=True)
class RegexClean(DocumentFilter):
    """Removes control characters and every line matching one of `drop_line_patterns`
    (boilerplate such as licence headers), collapses runs of blank lines; rejects documents
    left empty."""

    drop_line_patterns: list[str] = dataclasses.field(default_factory=list)
    max_blank_lines: int = 2

    def __post_init__(self) -> None:
        self._drop = [re.compile(p) for p in self.drop_line_patterns]

    def process(self, doc: Document) -> Document | None:
        text = _CONTROL.sub("", doc.text)
        if self._drop:
            text = "\n".join(line for line in text.split("\n") if not any(p.search(line) for p in self._drop))
        runs = re.compile(rf"\n{{{self.max_blank_lines + 2},}}")  # more blank lines in a row than allowed
        text = runs.sub("\n" * (self.max_blank_lines + 1), text).strip("\n")
        return doc.replace_text(text) if text.strip() else None


@DATA_FILTER.register("length")
@dataclasses.dataclass(kw_only=True)
class LengthFilter(DocumentFilter):
    """Keeps documents with min_chars <= characters <= max_chars and at least min_words words."""

    min_chars: int = 1
    max_chars: int = 10_000_000
    min_words: int = 0

    def process(self, doc: Document) -> Document | None:
        n = len(doc.text)
        if not self.min_chars <= n <= self.max_chars or len(doc.text.split()) < self.min_words:
            return None
        return doc


@DATA_FILTER.register("prose_quality")
@dataclasses.dataclass(kw_only=True)
class ProseHeuristics(DocumentFilter):
    """Gopher-style prose rules: mean word length in [min, max]; at most `max_symbol_ratio`
    of '#' / '...' per word; at least `min_alpha_words` of words with a letter; at most
    `max_bullet_lines` of lines starting with a bullet."""

    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1
    min_alpha_words: float = 0.8
    max_bullet_lines: float = 0.9

    def process(self, doc: Document) -> Document | None:
        words = doc.text.split()
        if not words:
            return None
        mean_length = sum(len(w) for w in words) / len(words)
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("\u2026")
        alpha = sum(any(c.isalpha() for c in w) for w in words) / len(words)
        lines = [line for line in doc.text.split("\n") if line.strip()]
        bullets = sum(line.lstrip().startswith(("*", "-", "\u2022")) for line in lines) / max(1, len(lines))
        ok = (self.min_mean_word_length <= mean_length <= self.max_mean_word_length
              and symbols / len(words) <= self.max_symbol_ratio and alpha >= self.min_alpha_words
              and bullets <= self.max_bullet_lines)
        return doc if ok else None


@DATA_FILTER.register("repetition")
@dataclasses.dataclass(kw_only=True)
class RepetitionFilter(DocumentFilter):
    """Gopher repetition rules: duplicated lines may cover at most `max_duplicate_line_chars`
    of the characters, and the most frequent word n-gram at most `max_top_ngram_chars`."""

    max_duplicate_line_chars: float = 0.3
    ngram: int = 2
    max_top_ngram_chars: float = 0.2

    def process(self, doc: Document) -> Document | None:
        lines = [line for line in doc.text.split("\n") if line.strip()]
        total = max(1, sum(len(line) for line in lines))
        seen: set[str] = set()
        duplicated = 0
        for line in lines:
            if line in seen:
                duplicated += len(line)
            seen.add(line)
        if duplicated / total > self.max_duplicate_line_chars:
            return None
        words = doc.text.split()
        grams = Counter(tuple(words[i: i + self.ngram]) for i in range(len(words) - self.ngram + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(len(w) for w in gram) / max(1, len(doc.text)) > self.max_top_ngram_chars:
                return None
        return doc


@DATA_FILTER.register("code_quality")
@dataclasses.dataclass(kw_only=True)
class CodeHeuristics(DocumentFilter):
    """StarCoder-style code rules: longest line <= max_line_length, mean line length <=
    max_mean_line_length, alphanumeric fraction >= min_alnum_fraction, and no marker of
    generated files in the first lines."""

    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    generated_markers: list[str] = dataclasses.field(
        default_factory=lambda: ["auto-generated", "autogenerated", "automatically generated", "do not edit"])

    def process(self, doc: Document) -> Document | None:
        lines = doc.text.split("\n")
        if max(len(line) for line in lines) > self.max_line_length:
            return None
        if sum(len(line) for line in lines) / len(lines) > self.max_mean_line_length:
            return None
        if sum(c.isalnum() for c in doc.text) / max(1, len(doc.text)) < self.min_alnum_fraction:
            return None
        head = "\n".join(lines[:5]).lower()
        return None if any(marker in head for marker in self.generated_markers) else doc
