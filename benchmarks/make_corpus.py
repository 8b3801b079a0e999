"""A synthetic English-like corpus of any size, with planted duplicates, for the data scale benchmark.

    python benchmarks/make_corpus.py --gigabytes 1 --out /tmp/corpus [--files 16] [--seed 0]
                                     [--duplicate-fraction 0.06] [--control-fraction 0.02]
                                     [--compression zst|gz|none] [--processes N]

Writes OUT/part-00000.jsonl.zst ... (zstd level 3, one {"id", "text"} object per line),
OUT/.manifest.jsonl (one line per planted document) and OUT/.corpus.json (sizes, counts, the
settings). The files are written by independent streams of 4 (part-00000, -00004, -00008,
-00012 by the first of 4 streams, ...), one process per stream at a time; a stream deals its
documents round-robin to its files, so every file spans the whole run, and puts a planted
copy in another file than its original. The output depends on the settings alone, not on
the number of processes. Memory stays small: a batch of documents and, per stream, a
reservoir of earlier ones (the candidates to copy).

Text: words drawn from a fixed vocabulary (286 common English words, then 30,000
made-up pronounceable ones, shorter ones more frequent) with Zipf frequencies, in sentences of
6-25 words (capitalised, the odd comma, a full stop), paragraphs of a few sentences separated by
blank lines, documents of about 300-8,000 characters (log-uniform). Word ids are sampled with
numpy a batch at a time and rendered through a table of every word in each of its forms
("word ", "Word ", "word. ", ...), which keeps generation fast.

Planted documents (`--duplicate-fraction` of all, half exact and half near copies, plus
`--control-fraction` controls), each of a fresh document from the reservoir:
    exact    the same text;
    near     0.5-2.5% of its words replaced, inserted or deleted, kept only when the word
             3-shingle Jaccard similarity with the original (`dedup.shingles(text, 3)`) is >= 0.85;
    control  "different but related": a tenth to a half of its words rewritten (scattered, or
             one run), Jaccard 0.3-0.6; deduplication must keep these.
Each planted document's Jaccard similarity with its original is computed exactly and recorded.
A manifest line: {"source": "/abs/OUT/part-00003.jsonl.zst:17", "original": "...:5", "kind": ...,
"jaccard": ...}: the absolute file path and 1-based line, as the pipeline names a row.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import gzip
import io
import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from typing import IO

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tessera.components.data.dedup import shingles  # noqa: E402

FORMAT = 1  # bump when the generated text changes, so that data_scale.py does not reuse old corpora
COMMON = ("the of and to a in is that it was for on are as with his they at be this from have or by one had not "
          "but what all were when we there can an your which their said if do will each about how up out them then "
          "she many some so these would other into has more her two like him see time could no make than first "
          "been its who now people my made over did down only way find use may water long little very after words "
          "called just where most know get through back much before go good new write our used me man too any day "
          "same right look think also around another came come work three word must because does part even place "
          "well such here take why help put different away again off went old number great tell men say small every "
          "found still between name should home big give air line set own under read last never us left end along "
          "while might next sound below saw something thought both few those always show large often together asked "
          "house world going want school important until form food keep children feet land side without boy once "
          "animal life enough took four head above kind began almost live page got earth need far hand high year "
          "mother light country father let night picture being study second soon story since white ever paper hard "
          "near sentence better best across during today however sure knew try told young sun thing whole hear "
          "example heard several change answer room sea against top turned learn point city play toward five "
          "himself usually money seen car morning given body family later became within").split()
SYNTHETIC_WORDS = 30_000
ZIPF_EXPONENT = 1.0
PLAIN, COMMA, CAPITAL, STOP, PARAGRAPH, LAST = range(6)  # the forms a word takes in the text
MIN_CHARS, MAX_CHARS = 300, 8000
NEAR_MIN_JACCARD = 0.85
CONTROL_JACCARD = (0.3, 0.6)
RESERVOIR = 4096  # earlier fresh documents kept as candidates to copy
BATCH_DOCS = 512  # fresh documents sampled at once
WRITE_CHUNK = 1 << 20  # bytes of lines handed to a file's compressor at once (one file's tables in cache)
FILES_PER_STREAM = 4  # files written by one stream (one process at a time)


@dataclasses.dataclass
class Vocabulary:
    """The word table: `table[form * size + id]` is word `id` written in `form` (also as one
    byte string `blob`, entry i at `offsets[i]`, `lengths[i]` bytes long, for rendering a
    whole batch with numpy). Word ids are drawn by inverting the Zipf distribution's
    cumulative sum `cdf`, started from a guide table (`guide[j]`: the first id whose
    cumulative probability reaches j / len(guide))."""

    table: list[str]
    cdf: np.ndarray
    size: int
    chars_per_word: float
    guide: np.ndarray
    blob: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` word ids drawn with Zipf frequencies."""
        u = rng.random(n)
        ids = self.guide[(u * len(self.guide)).astype(np.int64)]
        behind = np.flatnonzero(self.cdf[ids] < u)
        while behind.size:  # a step or two for the rarer words
            ids[behind] += 1
            behind = behind[self.cdf[ids[behind]] < u[behind]]
        return ids

    def render(self, codes: np.ndarray) -> str:
        """The text of a document given as codes (form * size + id)."""
        return "".join(map(self.table.__getitem__, codes.tolist()))

    def render_batch(self, codes: np.ndarray, ends: np.ndarray) -> list[bytes]:
        """The UTF-8 texts of a batch of documents (codes, each document's end offset)."""
        lengths = self.lengths[codes]
        written = np.cumsum(lengths, dtype=np.int32)  # a batch is a few MB: int32 offsets suffice
        gather = np.repeat(self.offsets[codes] - (written - lengths), lengths)
        gather += np.arange(int(written[-1]), dtype=np.int32)
        text = self.blob[gather].tobytes()
        bounds = np.concatenate(([0], written[ends - 1])).tolist()
        return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _made_up_words(n: int, taken: set[str]) -> list[str]:
    """`n` distinct pronounceable words of 1-4 syllables (fixed: the vocabulary never depends
    on --seed), shortest first so that the most frequent are the shortest."""
    rng = np.random.default_rng(12345)
    onsets = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sh sk sl sp st th tr".split()
    vowels = "a e i o u ai ea ee ie oa ou".split()
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words: set[str] = set()
    while len(words) < n:
        counts = rng.choice([1, 2, 3, 4], p=[3 / 12, 5 / 12, 3 / 12, 1 / 12], size=n).tolist()
        picks = rng.integers(0, len(syllables), size=(n, 4)).tolist()
        for count, row in zip(counts, picks):
            word = "".join([syllables[i] for i in row[:count]])
            if word not in taken and len(words) < n:
                words.add(word)
    return sorted(words, key=lambda w: (len(w), w))


@functools.cache
def build_vocabulary() -> Vocabulary:
    """The corpus's vocabulary: common English words first, then the made-up ones (built once
    per process; forked workers inherit it)."""
    common = list(dict.fromkeys(COMMON))
    words = common + _made_up_words(SYNTHETIC_WORDS, set(common))
    weights = 1.0 / np.arange(1, len(words) + 1) ** ZIPF_EXPONENT
    probs = weights / weights.sum()
    forms = [lambda w: w + " ", lambda w: w + ", ", lambda w: w.capitalize() + " ", lambda w: w + ". ",
             lambda w: w + ".\n\n", lambda w: w + "."]
    table = [form(w) for form in forms for w in words]
    encoded = [entry.encode() for entry in table]
    lengths = np.array([len(b) for b in encoded], dtype=np.int32)
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0  # no draw may fall past the last word through rounding
    return Vocabulary(table=table, cdf=cdf, size=len(words), chars_per_word=float(np.dot(probs, lengths[:len(words)])),
                      guide=np.searchsorted(cdf, np.arange(1 << 20) / (1 << 20)).astype(np.int64),
                      blob=np.frombuffer(b"".join(encoded), dtype=np.uint8),
                      offsets=np.cumsum(lengths) - lengths, lengths=lengths)


def fresh_batch(vocab: Vocabulary, rng: np.random.Generator, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_docs` new documents as one array of codes and the end offset of each document."""
    target_chars = np.exp(rng.uniform(np.log(MIN_CHARS), np.log(MAX_CHARS), n_docs))
    target_words = np.maximum((target_chars / vocab.chars_per_word).astype(np.int64), 6).tolist()
    # enough sentences even if each is 6 words and each document overshoots by a whole sentence
    sentence_len = rng.integers(6, 26, size=(sum(target_words) + 25 * n_docs) // 6 + 1)
    sentence_end = np.cumsum(sentence_len)
    ends = sentence_end.tolist()
    last, start = [], 0
    for words in target_words:  # each document ends with the sentence that reaches its target
        last.append(bisect.bisect_left(ends, start + words))
        start = ends[last[-1]]
    n_sentences = last[-1] + 1
    sentence_end = sentence_end[:n_sentences]
    n_words = int(sentence_end[-1])
    form = np.zeros(n_words, dtype=np.int32)
    form[rng.random(n_words) < 0.04] = COMMA
    form[sentence_end - sentence_len[:n_sentences]] = CAPITAL
    form[sentence_end - 1] = np.where(rng.random(n_sentences) < 0.25, PARAGRAPH, STOP)
    doc_end = sentence_end[np.asarray(last)]
    form[doc_end - 1] = LAST
    return form * vocab.size + vocab.sample(rng, n_words), doc_end


def edit_words(codes: np.ndarray, edits: int, vocab: Vocabulary, rng: random.Random) -> np.ndarray:
    """A copy of `codes` with `edits` words replaced (by another word, same form), inserted
    (a plain word, not before a sentence start) or deleted (plain words only)."""
    out = codes.tolist()
    positions = sorted(rng.sample(range(len(out)), min(edits, len(out))), reverse=True)
    for pos in positions:  # from the end, so earlier positions stay valid
        form, word = divmod(out[pos], vocab.size)
        op = rng.choices(("replace", "insert", "delete"), weights=(3, 1, 1))[0]
        new = (word + rng.randrange(1, vocab.size)) % vocab.size
        if op == "insert" and form != CAPITAL:
            out.insert(pos, PLAIN * vocab.size + new)
        elif op == "delete" and form in (PLAIN, COMMA):
            del out[pos]
        else:
            out[pos] = form * vocab.size + new
    return np.asarray(out, dtype=np.int32)


def rewrite_words(codes: np.ndarray, share: float, block: bool, vocab: Vocabulary,
                  rng: np.random.Generator) -> np.ndarray:
    """A copy of `codes` with `share` of its words replaced by fresh ones (forms kept):
    one contiguous run of them with `block`, else scattered at random."""
    out = codes.copy()
    n = len(out)
    if block:
        length = int(share * n)
        start = int(rng.integers(0, n - length + 1))
        mask = np.zeros(n, dtype=bool)
        mask[start: start + length] = True
    else:
        mask = rng.random(n) < share
    out[mask] = (out[mask] // vocab.size) * vocab.size + vocab.sample(rng, int(mask.sum()))
    return out


def jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the word 3-shingle sets, as the deduplicator defines shingles."""
    sa, sb = set(shingles(a, 3)), set(shingles(b, 3))
    return len(sa & sb) / max(1, len(sa | sb))


def near_copy(codes: np.ndarray, text: str, vocab: Vocabulary, rng: random.Random) -> tuple[str, float] | None:
    """A near copy of a document (0.5-2.5% of its words edited) and its Jaccard similarity
    with it, or None when even one edit leaves it below `NEAR_MIN_JACCARD` (tried 4 times,
    halving the edits)."""
    edits = max(1, round(rng.uniform(0.005, 0.025) * len(codes)))
    for _ in range(4):
        copy = vocab.render(edit_words(codes, edits, vocab, rng))
        similarity = jaccard(text, copy) if copy != text else 1.0
        if copy != text and similarity >= NEAR_MIN_JACCARD:
            return copy, similarity
        edits = max(1, edits // 2)
    return None


def related_copy(codes: np.ndarray, text: str, vocab: Vocabulary, rng: np.random.Generator) -> tuple[str, float] | None:
    """A control: the document with enough words rewritten for a Jaccard similarity in
    `CONTROL_JACCARD` (aimed at a random value inside it; 4 tries), or None."""
    low, high = CONTROL_JACCARD
    for _ in range(4):
        aim = rng.uniform(low + 0.05, high - 0.05)
        block = bool(rng.random() < 0.5)
        # a rewritten run of share q keeps about (1 - q) / (1 + q); scattered rewrites at rate p
        # keep a shingle with probability s = (1 - p)^3, for a similarity of s / (2 - s)
        share = (1 - aim) / (1 + aim) if block else 1 - (2 * aim / (1 + aim)) ** (1 / 3)
        copy = vocab.render(rewrite_words(codes, share, block, vocab, rng))
        similarity = jaccard(text, copy)
        if low <= similarity <= high:
            return copy, similarity
    return None


class Shards:
    """The files of one stream (global numbers `numbers`), written round-robin, except that a
    planted copy skips the file its original is in."""

    def __init__(self, out: Path, numbers: list[int], compression: str, stream: int):
        suffix = {"zst": ".jsonl.zst", "gz": ".jsonl.gz", "none": ".jsonl"}[compression]
        self.paths = [Path(os.path.abspath(out)) / f"part-{i:05d}{suffix}" for i in numbers]
        self.streams = [self._open(path, compression) for path in self.paths]
        self.lines = [0] * len(numbers)
        self.pending: list[list[bytes]] = [[] for _ in numbers]  # lines not yet compressed, per file
        self.pending_bytes = [0] * len(numbers)
        self.stream = stream
        self.documents = 0
        self.text_bytes = 0

    @staticmethod
    def _open(path: Path, compression: str) -> IO[bytes]:
        if compression == "zst":
            import zstandard

            return zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"))
        if compression == "gz":  # level 1: the default level 6 would be the bottleneck here
            return gzip.open(path, "wb", compresslevel=1)
        return io.BufferedWriter(open(path, "wb", buffering=0), buffer_size=1 << 20)

    def write(self, text: str | bytes, avoid: int = -1) -> tuple[str, int]:
        """Write one document, not into file `avoid` (an index into `paths`) where there is
        another; returns its source name "path:line" (line 1-based) and its file's index.
        `text` as bytes must be the vocabulary's plain ASCII (a newline is all JSON escapes)."""
        i = self.documents % len(self.paths)
        if i == avoid and len(self.paths) > 1:
            i = (i + 1) % len(self.paths)
        doc_id = f"s{self.stream:03d}-{self.documents:010d}"
        if isinstance(text, bytes):
            line = b'{"id": "%s", "text": "%s"}\n' % (doc_id.encode(), text.replace(b"\n", b"\\n"))
        else:
            line = (json.dumps({"id": doc_id, "text": text}) + "\n").encode()
        self.pending[i].append(line)
        self.pending_bytes[i] += len(line)
        if self.pending_bytes[i] >= WRITE_CHUNK:
            self._flush(i)
        self.lines[i] += 1
        self.documents += 1
        self.text_bytes += len(text)  # the text is ASCII: characters are bytes
        return f"{self.paths[i]}:{self.lines[i]}", i

    def _flush(self, i: int) -> None:
        """Hand file `i`'s pending lines to its compressor."""
        self.streams[i].write(b"".join(self.pending[i]))
        self.pending[i].clear()
        self.pending_bytes[i] = 0

    def close(self) -> None:
        """Compress what is pending and close every file."""
        for i, stream in enumerate(self.streams):
            self._flush(i)
            stream.close()


@dataclasses.dataclass
class Original:
    """A fresh document kept as a candidate to copy."""

    codes: np.ndarray
    source: str
    file: int


class Planter:
    """Writes fresh documents and planted ones, keeping a reservoir sample of the fresh ones
    written so far (the originals to copy) and the manifest of what was planted."""

    def __init__(self, shards: Shards, manifest: IO[str], vocab: Vocabulary, seed: int):
        self.shards, self.manifest, self.vocab = shards, manifest, vocab
        self.nrng = np.random.default_rng([seed, shards.stream])
        self.prng = random.Random(seed * 100_003 + shards.stream)
        self.reservoir: list[Original] = []
        self.fresh_seen = 0
        self.jaccards: dict[str, list[float]] = {"exact": [], "near": [], "control": []}

    def fresh(self, codes: np.ndarray, text: bytes) -> None:
        """Write a fresh document (`codes` rendered as `text`) and offer it to the reservoir
        (Algorithm R)."""
        source, file = self.shards.write(text)
        self.fresh_seen += 1
        if len(self.reservoir) < RESERVOIR:
            self.reservoir.append(Original(codes.copy(), source, file))
        elif (slot := self.prng.randrange(self.fresh_seen)) < RESERVOIR:
            self.reservoir[slot] = Original(codes.copy(), source, file)

    def plant(self, kind: str) -> None:
        """Write an exact / near / control copy of a random earlier fresh document, in another
        file (nothing when there is none yet, or no copy of the wanted similarity came out)."""
        if not self.reservoir:
            return
        original = self.reservoir[self.prng.randrange(len(self.reservoir))]
        text = self.vocab.render(original.codes)
        if kind == "exact":
            made: tuple[str, float] | None = (text, 1.0)
        elif kind == "near":
            made = near_copy(original.codes, text, self.vocab, self.prng)
        else:
            made = related_copy(original.codes, text, self.vocab, self.nrng)
        if made is None:
            return
        source, _ = self.shards.write(made[0], avoid=original.file)
        self.jaccards[kind].append(made[1])
        self.manifest.write(json.dumps({"source": source, "original": original.source, "kind": kind,
                                        "jaccard": round(made[1], 6)}) + "\n")

    def run(self, text_bytes: float, duplicate_fraction: float, control_fraction: float) -> None:
        """Write documents until `text_bytes` of text: each slot is fresh, or with the given
        probabilities an exact, near or control copy."""
        kinds = ("fresh", "exact", "near", "control")
        probs = [1 - duplicate_fraction - control_fraction, duplicate_fraction / 2, duplicate_fraction / 2,
                 control_fraction]
        while self.shards.text_bytes < text_bytes:
            codes, ends = fresh_batch(self.vocab, self.nrng, BATCH_DOCS)
            starts = np.concatenate(([0], ends[:-1]))
            texts = self.vocab.render_batch(codes, ends)
            next_fresh = 0
            for kind in self.nrng.choice(4, size=2 * BATCH_DOCS, p=probs).tolist():
                if next_fresh == BATCH_DOCS or self.shards.text_bytes >= text_bytes:
                    break
                if kind == 0:
                    self.fresh(codes[starts[next_fresh]: ends[next_fresh]], texts[next_fresh])
                    next_fresh += 1
                else:
                    self.plant(kinds[kind])


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to generate (the corpus depends on nothing else; not on how many processes)."""

    out: Path
    gigabytes: float
    files: int = 16
    seed: int = 0
    duplicate_fraction: float = 0.06
    control_fraction: float = 0.02
    compression: str = "zst"

    @property
    def streams(self) -> int:
        """Independent streams, each writing every `streams`-th file with its own originals."""
        return max(1, self.files // FILES_PER_STREAM)


def write_stream(spec: Spec, stream: int) -> dict:
    """Write one stream's files and its part of the manifest; returns its counts (runs in a
    worker process)."""
    shards = Shards(spec.out, list(range(stream, spec.files, spec.streams)), spec.compression, stream)
    with open(spec.out / f".manifest-{stream:03d}.jsonl", "w") as manifest:
        planter = Planter(shards, manifest, build_vocabulary(), spec.seed)
        try:
            planter.run(spec.gigabytes * 1e9 / spec.streams, spec.duplicate_fraction, spec.control_fraction)
        finally:
            shards.close()
    return {"documents": shards.documents, "text_bytes": shards.text_bytes, "jaccards": planter.jaccards,
            "file_bytes": sum(p.stat().st_size for p in shards.paths)}


def generate(spec: Spec, processes: int | None = None) -> dict:
    """Write the corpus `spec` describes, its streams in `processes` processes (default: one
    per stream, at most one per CPU core); returns what corpus.json holds."""
    if not 0 <= spec.duplicate_fraction + spec.control_fraction < 1:
        raise ValueError("--duplicate-fraction + --control-fraction must be in [0, 1)")
    if spec.files < 1 or spec.gigabytes <= 0:
        raise ValueError("--files must be >= 1 and --gigabytes > 0")
    spec.out.mkdir(parents=True, exist_ok=True)
    for stale in [*spec.out.glob("part-*.jsonl*"), *spec.out.glob(".manifest-*.jsonl")]:
        stale.unlink()
    processes = processes or min(spec.streams, len(os.sched_getaffinity(0)))
    build_vocabulary()  # once, before the workers fork
    start = time.perf_counter()
    work = functools.partial(write_stream, spec)
    if processes > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(processes) as pool:
            parts = pool.map(work, range(spec.streams), chunksize=1)
    else:
        parts = [work(stream) for stream in range(spec.streams)]
    with open(spec.out / ".manifest.jsonl", "w") as manifest:
        for stream in range(spec.streams):
            part = spec.out / f".manifest-{stream:03d}.jsonl"
            manifest.write(part.read_text())
            part.unlink()
    seconds = time.perf_counter() - start
    jaccards = {kind: [j for part in parts for j in part["jaccards"][kind]] for kind in ("exact", "near", "control")}
    text_bytes = sum(part["text_bytes"] for part in parts)
    meta = {"format": FORMAT, **{k: v for k, v in dataclasses.asdict(spec).items() if k != "out"},
            "path": os.path.abspath(spec.out), "documents": sum(part["documents"] for part in parts),
            "text_bytes": text_bytes, "file_bytes": sum(part["file_bytes"] for part in parts),
            "planted": {kind: len(v) for kind, v in jaccards.items()},
            "jaccard_range": {kind: [min(v), max(v)] for kind, v in jaccards.items() if v},
            "processes": processes, "seconds": round(seconds, 3),
            "text_mb_per_s": round(text_bytes / 1e6 / seconds, 2)}
    (spec.out / ".corpus.json").write_text(json.dumps(meta, indent=1))
    return meta


def summary_table(meta: dict) -> Table:
    """What was generated, as a rich table."""
    table = Table(title=f"synthetic corpus in {meta['path']} ({meta['processes']} processes)")
    for col in ("documents", "text MB", "files MB", "files", "exact", "near (Jaccard)", "control (Jaccard)",
                "seconds", "MB/s"):
        table.add_column(col, justify="right")
    ranges = meta["jaccard_range"]

    def planted(kind: str) -> str:
        low_high = f" ({ranges[kind][0]:.2f}-{ranges[kind][1]:.2f})" if kind in ranges else ""
        return f"{meta['planted'][kind]:,}{low_high}"

    table.add_row(f"{meta['documents']:,}", f"{meta['text_bytes'] / 1e6:,.1f}", f"{meta['file_bytes'] / 1e6:,.1f}",
                  str(meta["files"]), planted("exact"), planted("near"), planted("control"),
                  f"{meta['seconds']:.1f}", f"{meta['text_mb_per_s']:.1f}")
    return table


def parser() -> argparse.ArgumentParser:
    """The command line."""
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--gigabytes", type=float, required=True, help="text to write, in GB (1e9 bytes)")
    args.add_argument("--out", type=Path, required=True, help="the folder to write (its part-* files are replaced)")
    args.add_argument("--files", type=int, default=16, help="output files (the pipeline's input shards)")
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--duplicate-fraction", type=float, default=0.06,
                      help="share of documents that are planted copies, half exact and half near")
    args.add_argument("--control-fraction", type=float, default=0.02,
                      help="share of documents that are related-but-different controls (Jaccard 0.3-0.6)")
    args.add_argument("--compression", choices=("zst", "gz", "none"), default="zst")
    args.add_argument("--processes", type=int, default=None,
                      help="processes writing streams at once (default: one per stream, at most one per core); "
                           "the corpus is the same for any count")
    return args


def main(argv: list[str] | None = None) -> None:
    """Write the corpus the command line asks for and print what was written."""
    ns = parser().parse_args(argv)
    spec = Spec(out=ns.out, gigabytes=ns.gigabytes, files=ns.files, seed=ns.seed,
                duplicate_fraction=ns.duplicate_fraction, control_fraction=ns.control_fraction,
                compression=ns.compression)
    Console(width=150).print(summary_table(generate(spec, ns.processes)))


if __name__ == "__main__":
    main()
