"""Rule-based cleaning: regex line cleaning, length, symbol, repetition (Gopher/C4-style for
prose) and code-shape (StarCoder-style) filters. Thresholds are per-instance, so each domain
gets its own: web heuristics would destroy code and documentation.

The filters run on every document of a corpus, so each takes the cheap path when it can
(C-level string methods instead of per-character Python loops, bounds that make a costly
count unnecessary) while deciding exactly as the plain definitions in their docstrings.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

from tessera.components.data import minhash
from tessera.components.data.document import Document
from tessera.components.interfaces import DocumentFilter
from tessera.registry.kinds import DATA_FILTER

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The same characters as bytes: in UTF-8 these byte values only ever encode themselves.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_NOT_ASCII_ALNUM = bytes(c for c in range(128) if not chr(c).isalnum())
# Regex constructs whose meaning on one line differs from their meaning inside the whole
# text: string anchors, lookarounds, atomic groups / possessive repeats, and turning flags off.
_NOT_LINE_LOCAL = re.compile(r"\\[AZz]|\(\?[<=!>]|[*+?}]\+|\(\?[a-zA-Z]*-")


def without_controls(text: str) -> str:
    """`text` without the control characters of `_CONTROL` (tab, newline and carriage return
    stay); the same string object when it has none. Deleting bytes is several times faster
    than a regex scan, and exact: UTF-8 never uses these byte values inside a multi-byte
    character."""
    data = text.encode("utf-8", "surrogatepass")
    kept = data.translate(None, _CONTROL_BYTES)
    return text if len(kept) == len(data) else kept.decode("utf-8", "surrogatepass")


def _line_local(pattern: str) -> bool:
    """Whether a search for `pattern` with re.MULTILINE over a whole text is sure to match when
    the pattern matches one of its lines (no construct that looks past a line's ends)."""
    return _NOT_LINE_LOCAL.search(pattern) is None


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
        # one search over the whole text finds no match => no line matches, so the per-line
        # loop only runs on documents that may lose a line (None: a pattern that needs it always)
        self._probes = [re.compile(p, re.MULTILINE) if _line_local(p) else None for p in self.drop_line_patterns]
        self._run = "\n" * (self.max_blank_lines + 2)  # more blank lines in a row than allowed
        self._runs = re.compile(rf"\n{{{self.max_blank_lines + 2},}}")
        self._fill = "\n" * (self.max_blank_lines + 1)

    def process(self, doc: Document) -> Document | None:
        text = without_controls(doc.text)
        if self._drop and any(probe is None or probe.search(text) for probe in self._probes):
            text = "\n".join(line for line in text.split("\n") if not any(p.search(line) for p in self._drop))
        if self._run in text:  # a substring search is far cheaper than the regex scan
            text = self._runs.sub(self._fill, text)
        text = text.strip("\n")
        if not text or text.isspace():
            return None
        return doc if text is doc.text else doc.replace_text(text)


@DATA_FILTER.register("length")
@dataclasses.dataclass(kw_only=True)
class LengthFilter(DocumentFilter):
    """Keeps documents with min_chars <= characters <= max_chars and at least min_words words."""

    min_chars: int = 1
    max_chars: int = 10_000_000
    min_words: int = 0

    def process(self, doc: Document) -> Document | None:
        if not self.min_chars <= len(doc.text) <= self.max_chars:
            return None
        if self.min_words > 0:
            # splitting at most min_words - 1 times yields min(words, min_words) pieces
            # (the last the unsplit rest): no list of every word
            if len(doc.text.split(maxsplit=self.min_words - 1)) < self.min_words:
                return None
        return doc


def _has_text(line: str) -> bool:
    """line.strip() != '' without building the stripped copy."""
    return bool(line) and not line.isspace()


def _word_stats(text: str) -> tuple[int, int, int]:
    """(len(words), sum(map(len, words)), how many words have an alphabetic character) for
    words = text.split(), counted on the UTF-8 bytes with numpy (no Python string per word).

    Characters are the bytes that do not continue a multi-byte sequence. A word with an ASCII
    letter has an alphabetic character; a word with neither letters nor non-ASCII bytes has
    none; only the rest (no ASCII letter, some non-ASCII character) is decoded and checked
    with str.isalpha, as the plain definition does for every word.
    """
    data, starts, lengths = minhash.word_spans(text)
    if len(starts) == 0:
        return 0, 0, 0
    b = np.frombuffer(data, dtype=np.uint8)
    # a word's count of some kind of byte is the difference of running counts at its ends
    before, last = starts - 1, starts + lengths - 1
    letters = np.cumsum(((b | np.uint8(0x20)) - np.uint8(0x61)) < 26, dtype=np.int32)  # [A-Za-z]
    has_letter = letters[last] > letters[before]
    alpha = int(np.count_nonzero(has_letter))
    if text.isascii():
        return len(starts), int(lengths.sum()), alpha
    continuing = np.cumsum((b & np.uint8(0xC0)) == 0x80, dtype=np.int32)  # bytes inside a character
    inner = continuing[last] - continuing[before]  # > 0: the word has a non-ASCII character
    for i in np.flatnonzero((inner > 0) & ~has_letter).tolist():
        word = data[starts[i]: starts[i] + lengths[i]].decode("utf-8", "surrogatepass")
        alpha += any(c.isalpha() for c in word)
    return len(starts), int(lengths.sum() - inner.sum()), alpha


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
        text = doc.text
        n_words, chars, alpha = _word_stats(text)
        if not n_words:
            return None
        # the rules in increasing cost; the first that fails decides
        if not self.min_mean_word_length <= chars / n_words <= self.max_mean_word_length:
            return None
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if not symbols / n_words <= self.max_symbol_ratio:
            return None
        if not alpha / n_words >= self.min_alpha_words:
            return None
        lines = list(filter(_has_text, text.split("\n")))
        bullets = sum(line.lstrip().startswith(("*", "-", "\u2022")) for line in lines) / max(1, len(lines))
        return doc if bullets <= self.max_bullet_lines else None


@DATA_FILTER.register("repetition")
@dataclasses.dataclass(kw_only=True)
class RepetitionFilter(DocumentFilter):
    """Gopher repetition rules: duplicated lines may cover at most `max_duplicate_line_chars`
    of the characters, and the most frequent word n-gram at most `max_top_ngram_chars`.

    Duplicated characters are those of every repeat of an earlier non-blank line. The n-gram
    rule takes the most frequent word n-gram (the first in the text among equally frequent
    ones) and rejects when it occurs more than once and count * its characters (words
    without separators) / the document's characters exceeds `max_top_ngram_chars`."""

    max_duplicate_line_chars: float = 0.3
    ngram: int = 2
    max_top_ngram_chars: float = 0.2

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {self.ngram}")

    def process(self, doc: Document) -> Document | None:
        if not self._lines_ok(doc.text):
            return None
        return doc if self._top_ngram_ok(doc.text, *_heaviest_word_bound(doc.text)) else None

    def process_batch(self, docs: list[Document]) -> list[Document | None]:
        """`process` of each, with the n-gram rule's word bound computed for all at once."""
        out: list[Document | None] = [None] * len(docs)
        passing = [i for i, doc in enumerate(docs) if self._lines_ok(doc.text)]
        n_words, heaviest = _heaviest_word_bounds([docs[i].text for i in passing])
        for i, n, bound in zip(passing, n_words.tolist(), heaviest.tolist()):
            if self._top_ngram_ok(docs[i].text, n, bound):
                out[i] = docs[i]
        return out

    def _lines_ok(self, text: str) -> bool:
        """The duplicated-lines rule."""
        lines = list(filter(_has_text, text.split("\n")))
        total = max(1, sum(map(len, lines)))
        counts = Counter(lines)
        duplicated = 0 if len(counts) == len(lines) else sum(len(line) * (n - 1) for line, n in counts.items())
        return duplicated / total <= self.max_duplicate_line_chars

    def _top_ngram_ok(self, text: str, n_words: int, heaviest: float) -> bool:
        """The n-gram rule, given `_heaviest_word_bound(text)`. An n-gram occurring c times has
        c <= count(w) for each of its words w, so c * chars <= n * max over words of
        count(w) * len(w); when even that bound passes (natural text), the costly split and
        count of every n-gram are skipped."""
        size = max(1, len(text))
        if n_words < self.ngram or self.ngram * heaviest / size <= self.max_top_ngram_chars:
            return True
        words = text.split()
        grams = Counter(zip(*(words[i:] for i in range(self.ngram))))
        gram, count = grams.most_common(1)[0]
        return not (count > 1 and count * sum(map(len, gram)) / size > self.max_top_ngram_chars)


def _heaviest_word_bound(text: str) -> tuple[int, float]:
    """(len(text.split()), a number >= max over distinct words w of count(w) * len(w)).

    Words are keyed with numpy (no Python string per word) into 4096 buckets by the top bits
    of their key, and the bound is the largest bucket's sum of UTF-8 lengths: a bucket holds
    every occurrence of its words, and a word's UTF-8 length is at least its length in
    characters, so sharing a bucket or being non-ASCII only loosens the bound."""
    keys, lengths = minhash.word_keys(text)
    buckets = (keys >> np.uint64(52)).view(np.int64)
    return len(keys), float(np.bincount(buckets, weights=lengths, minlength=4096).max(initial=0))


def _heaviest_word_bounds(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`_heaviest_word_bound` of each text [n] int64, [n] float64: every text's words counted
    into its own 4096 buckets in one bincount."""
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    keys, lengths, offsets = minhash.flat_word_keys(texts)
    counts = np.diff(offsets)
    text_of = np.repeat(np.arange(len(texts)), counts)
    buckets = text_of * 4096 + (keys >> np.uint64(52)).view(np.int64)
    sums = np.bincount(buckets, weights=lengths, minlength=len(texts) * 4096).reshape(len(texts), 4096)
    return counts, sums.max(axis=1)


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
        text = doc.text
        lines = text.split("\n")
        if max(map(len, lines)) > self.max_line_length:
            return None
        if sum(map(len, lines)) / len(lines) > self.max_mean_line_length:
            return None
        if text.isascii():  # deleting the other bytes counts [A-Za-z0-9], str.isalnum on ASCII
            alnum = len(text.encode("ascii").translate(None, _NOT_ASCII_ALNUM))
        else:
            alnum = sum(map(str.isalnum, text))
        if alnum / max(1, len(text)) < self.min_alnum_fraction:
            return None
        head = "\n".join(lines[:5]).lower()
        return None if any(marker in head for marker in self.generated_markers) else doc
