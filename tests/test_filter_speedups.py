"""The heuristic filters' fast paths decide exactly as their plain definitions.

Each reference below is the straightforward implementation the filters had before they were
made faster; every filter must return the same text (or the same rejection) on a corpus
made to hit the edges: blank and whitespace-only lines, repeated lines, runs of blank lines,
control characters, Unicode letters, digits and spaces, lone surrogates, short documents,
and n-gram count ties between grams of different lengths.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from tessera.components.data.document import Document
from tessera.components.data.filters.heuristics import (
    CodeHeuristics,
    LengthFilter,
    ProseHeuristics,
    RegexClean,
    RepetitionFilter,
    _heaviest_word_bound,
    _line_local,
    _word_stats,
    without_controls,
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def ref_regex_clean(text: str, patterns: list[str], max_blank_lines: int) -> str | None:
    drop = [re.compile(p) for p in patterns]
    text = _CONTROL.sub("", text)
    if drop:
        text = "\n".join(line for line in text.split("\n") if not any(p.search(line) for p in drop))
    runs = re.compile(rf"\n{{{max_blank_lines + 2},}}")
    text = runs.sub("\n" * (max_blank_lines + 1), text).strip("\n")
    return text if text.strip() else None


def ref_length(text: str, min_chars: int, max_chars: int, min_words: int) -> bool:
    return not (not min_chars <= len(text) <= max_chars or len(text.split()) < min_words)


def ref_prose(text: str, min_mean: float, max_mean: float, max_symbol: float, min_alpha: float,
              max_bullet: float) -> bool:
    words = text.split()
    if not words:
        return False
    mean_length = sum(len(w) for w in words) / len(words)
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    alpha = sum(any(c.isalpha() for c in w) for w in words) / len(words)
    lines = [line for line in text.split("\n") if line.strip()]
    bullets = sum(line.lstrip().startswith(("*", "-", "\u2022")) for line in lines) / max(1, len(lines))
    return (min_mean <= mean_length <= max_mean and symbols / len(words) <= max_symbol and alpha >= min_alpha
            and bullets <= max_bullet)


def ref_repetition(text: str, max_dup: float, ngram: int, max_top: float) -> bool:
    lines = [line for line in text.split("\n") if line.strip()]
    total = max(1, sum(len(line) for line in lines))
    seen: set[str] = set()
    duplicated = 0
    for line in lines:
        if line in seen:
            duplicated += len(line)
        seen.add(line)
    if duplicated / total > max_dup:
        return False
    words = text.split()
    grams = Counter(tuple(words[i: i + ngram]) for i in range(len(words) - ngram + 1))
    if grams:
        gram, count = grams.most_common(1)[0]
        if count > 1 and count * sum(len(w) for w in gram) / max(1, len(text)) > max_top:
            return False
    return True


def ref_code(text: str, max_line: int, max_mean: float, min_alnum: float, markers: list[str]) -> bool:
    lines = text.split("\n")
    if max(len(line) for line in lines) > max_line:
        return False
    if sum(len(line) for line in lines) / len(lines) > max_mean:
        return False
    if sum(c.isalnum() for c in text) / max(1, len(text)) < min_alnum:
        return False
    head = "\n".join(lines[:5]).lower()
    return not any(marker in head for marker in markers)


WORDS = ("the of and to a in is that for it with as was on be by this are from or copyright "
         "licensed queue thread module Class VALUE x y z").split()
ODD_WORDS = ["naïve", "Σίσυφος", "ΣΑΣ", "日本語", "²³", "½", "Ⅻ", "١٢٣", "e\u0301", "\U0001f600", "\ud800", "...",
             "\u2026", "#", "###", "--", "1984", "3.14", "—", "İstanbul", "ß", "_", "a_b", "#tag", "x\x07y"]
SPACES = [" ", " ", " ", "  ", "\t", "\xa0", "\u2003", "\u3000", "\x85", "\u2028", "\x1c", "\x0b", "\x0c", "\r"]
CONTROLS = ["\x00", "\x07", "\x1b", "\x7f", "\x1f", "\x0e"]


def _line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.08:
        return ""
    if kind < 0.12:
        return rng.choice([" ", "\t", "  \t ", "\xa0"])
    words = [rng.choice(ODD_WORDS if rng.random() < 0.15 else WORDS) for _ in range(rng.randint(1, 14))]
    words = [w.capitalize() if rng.random() < 0.1 else w for w in words]
    line = "".join(w + rng.choice(SPACES) for w in words).rstrip(" ")
    if rng.random() < 0.1:
        line = rng.choice(["* ", "- ", "\u2022 ", "  * ", "# "]) + line
    if rng.random() < 0.05:
        line += rng.choice(CONTROLS)
    return line


def corpus(n: int = 500, seed: int = 0) -> list[str]:
    """Documents for the equivalence checks, from empty ones to repetitive and odd ones."""
    rng = random.Random(seed)
    docs = ["", " ", "\n", "\n\n\n", "a", "a b", "## ...", "\x07", "word", "x\n" * 3, "\ud800\udc00 ok",
            "aa b aa b cccccc d cccccc d", "cccccc d cccccc d aa b aa b",  # n-gram count ties
            "buy now " * 60, "click here\n" * 20, "a\n\n\n\n\n\nb", "\n\n\nx\n\n\n", "\u3000".join(["w"] * 40)]
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 30)):
            if lines and rng.random() < 0.15:
                lines.append(rng.choice(lines))                      # a repeated line
            elif rng.random() < 0.08:
                lines.extend([""] * rng.randint(2, 7))                # a run of blank lines
            else:
                lines.append(_line(rng))
        text = "\n".join(lines)
        if rng.random() < 0.1:
            text = (" ".join(rng.choices(WORDS[:6], k=4)) + " ") * rng.randint(2, 40)  # one phrase repeated
        if rng.random() < 0.1:
            text = "\n" * rng.randint(1, 4) + text + "\n" * rng.randint(1, 4)
        docs.append(text)
    return docs


DOCS = corpus()


def doc(text: str) -> Document:
    return Document(text=text, domain="test")


def text_of(out: Document | None) -> str | None:
    return None if out is None else out.text


@pytest.mark.parametrize("patterns", [
    [], [r"(?i)copyright"], [r"(?i)^\s*#.*(copyright|all rights reserved|licensed under)"],
    [r"\Athe"], [r"(?<!of )the\b", r"is"], [r"^$"], [r"queue$", r"(?s)of.and"], [r"x*"], [r"(?=Class)"], [r"\bis\b"],
])
@pytest.mark.parametrize("max_blank_lines", [0, 2, 5])
def test_regex_clean_matches_reference(patterns, max_blank_lines):
    flt = RegexClean(drop_line_patterns=patterns, max_blank_lines=max_blank_lines)
    for text in DOCS:
        assert text_of(flt.process(doc(text))) == ref_regex_clean(text, patterns, max_blank_lines), repr(text[:80])


def test_line_local_patterns_and_control_removal():
    for pattern in [r"copyright", r"(?i)^\s*#.*licen[cs]e", r"end$", r"\bword\b", r"(?s)a.b", r"[^x]+"]:
        assert _line_local(pattern), pattern
    for pattern in [r"\Afoo", r"foo\Z", r"(?<=a)b", r"(?<!a)b", r"a(?=b)", r"a(?!b)", r"(?>a+)b", r"a*+",
                    r"a{2}+", r"(?-i:A)"]:
        assert not _line_local(pattern), pattern
    for text in DOCS:
        assert without_controls(text) == _CONTROL.sub("", text)
    clean = "no controls here\n\tat all"
    assert without_controls(clean) is clean


@pytest.mark.parametrize("min_chars,max_chars,min_words", [(1, 10_000_000, 0), (20, 400, 0), (0, 10**6, 1),
                                                           (10, 10**6, 5), (0, 10**6, 30), (5, 50, 3)])
def test_length_filter_matches_reference(min_chars, max_chars, min_words):
    flt = LengthFilter(min_chars=min_chars, max_chars=max_chars, min_words=min_words)
    decisions = [(flt.process(doc(text)) is not None) for text in DOCS]
    assert decisions == [ref_length(text, min_chars, max_chars, min_words) for text in DOCS]


@pytest.mark.parametrize("params", [(3.0, 10.0, 0.1, 0.8, 0.9), (3.0, 10.0, 0.2, 0.6, 0.9), (1.0, 20.0, 1.0, 0.95, 0.2),
                                    (2.0, 6.0, 0.05, 0.5, 0.5)])
def test_prose_heuristics_match_reference(params):
    flt = ProseHeuristics(min_mean_word_length=params[0], max_mean_word_length=params[1], max_symbol_ratio=params[2],
                          min_alpha_words=params[3], max_bullet_lines=params[4])
    decisions = [(flt.process(doc(text)) is not None) for text in DOCS]
    assert decisions == [ref_prose(text, *params) for text in DOCS]
    assert 0 < sum(decisions) < len(DOCS)  # the corpus exercises both outcomes


@pytest.mark.parametrize("max_dup,ngram,max_top", [(0.3, 2, 0.2), (0.1, 2, 0.05), (0.3, 1, 0.1), (0.5, 3, 0.02),
                                                   (0.3, 2, 0.3)])
def test_repetition_filter_matches_reference(max_dup, ngram, max_top):
    flt = RepetitionFilter(max_duplicate_line_chars=max_dup, ngram=ngram, max_top_ngram_chars=max_top)
    decisions = [(flt.process(doc(text)) is not None) for text in DOCS]
    assert decisions == [ref_repetition(text, max_dup, ngram, max_top) for text in DOCS]
    assert 0 < sum(decisions) < len(DOCS)
    # the batch path (the pipeline's) decides the same, in batches of mixed sizes
    docs = [doc(text) for text in DOCS]
    batched = [out for i in range(0, len(docs), 37) for out in flt.process_batch(docs[i: i + 37])]
    assert [out is not None for out in batched] == decisions
    assert all(out is None or out is d for out, d in zip(batched, docs))


def test_repetition_filter_takes_the_first_of_equally_frequent_ngrams():
    # both bigrams occur twice; only the first one (short) is measured, as most_common(1) does
    short_first, long_first = "aa b aa b cccccc d cccccc d", "cccccc d cccccc d aa b aa b"
    flt = RepetitionFilter(max_duplicate_line_chars=1.0, ngram=2, max_top_ngram_chars=0.4)
    assert (flt.process(doc(short_first)) is not None) == ref_repetition(short_first, 1.0, 2, 0.4) is True
    assert (flt.process(doc(long_first)) is not None) == ref_repetition(long_first, 1.0, 2, 0.4) is False
    with pytest.raises(ValueError, match="ngram"):
        RepetitionFilter(ngram=0)


@pytest.mark.parametrize("max_line,max_mean,min_alnum", [(1000, 100.0, 0.25), (40, 20.0, 0.6), (80, 30.0, 0.7)])
def test_code_heuristics_match_reference(max_line, max_mean, min_alnum):
    flt = CodeHeuristics(max_line_length=max_line, max_mean_line_length=max_mean, min_alnum_fraction=min_alnum)
    markers = flt.generated_markers
    texts = DOCS + ["# auto-generated\nx = 1", "déf f(x):\n    return x²", "{}[]();;" * 30]
    decisions = [(flt.process(doc(text)) is not None) for text in texts]
    assert decisions == [ref_code(text, max_line, max_mean, min_alnum, markers) for text in texts]
    assert 0 < sum(decisions) < len(texts)


def test_word_statistics_from_bytes_equal_those_of_split():
    """The numpy word counts behind ProseHeuristics and RepetitionFilter, on every document."""
    for text in DOCS + ["\ud800 \udfff\u2003\u00e9t\u00e9 \u00bd\u00b2 ..."]:
        words = text.split()
        exact = (len(words), sum(map(len, words)), sum(any(c.isalpha() for c in w) for w in words))
        assert _word_stats(text) == exact, repr(text[:80])
        n_words, bound = _heaviest_word_bound(text)
        counts = Counter(words)
        assert n_words == len(words) and bound >= max((n * len(w) for w, n in counts.items()), default=0)
