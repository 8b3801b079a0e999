"""Training on your own corpus: `data.path=FOLDER` of txt / jsonl / parquet files, malformed rows
skipped and listed with file and line (or, in strict mode, the first one stops preparation),
the prepared cache keyed on the files, and the flagship trained on it from the command line."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

import tessera.components.builtin  # noqa: F401
from tessera.components.data.defaults import stdlib_corpus
from tessera.components.data.document import Document
from tessera.components.data.pipeline import TextPipeline
from tessera.components.data.sources.files import LocalFiles
from tessera.components.data.sources.rows import MalformedRow, MalformedRowError

from helpers.launch import ROOT

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dan", "ber", "qua", "zo", "fi", "gle", "tor",
             "ost", "ing", "el", "um", "spa", "cre", "wid", "noy"]


def document(rng: random.Random, sentences: int = 4) -> str:
    """Pseudo-prose of invented words: varied enough for a 300-id BPE and no two alike."""
    out = []
    for _ in range(sentences):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


class Corpus:
    """A folder with good rows in every format and each kind of malformed row planted at a
    known place; `expected` maps each bad row's location (relative to the folder) to a phrase
    its reason must contain, and to the rows it stands for."""

    def __init__(self, root: Path, seed: int = 0):
        rng = random.Random(seed)
        self.root = root
        self.good = 0
        self.expected: dict[str, tuple[str, int]] = {}
        root.mkdir(parents=True)
        # a.jsonl: good rows with every kind of bad JSON row (and a blank line, which is no row)
        planted = {3: ('{"text": "unterminated', "malformed JSON"),
                   9: ('{"body": "the text is under another name"}', "no 'text' field"),
                   15: ('{"text": 42}', "is a number"), 21: ('{"text": null}', "is null"),
                   27: ('{"text": ["a", "list"]}', "is a list"), 33: ('{"text": {"nested": "object"}}', "is an object"),
                   39: ('{"text": ""}', "is empty"), 45: ('["not", "an", "object"]', "row is a list")}
        lines = []
        for line in range(1, 131):
            if line in planted:
                lines.append(planted[line][0])
                self.expected[f"a.jsonl:{line}"] = (planted[line][1], 1)
            elif line == 50:
                lines.append("")  # blank: skipped silently, but the numbering goes on
            else:
                lines.append(json.dumps({"id": line, "text": document(rng)}))
                self.good += 1
        (root / "a.jsonl").write_text("\n".join(lines) + "\n")
        # nested/b.jsonl.gz: compressed, in a subfolder, one broken line
        (root / "nested").mkdir()
        rows = [json.dumps({"text": document(rng)}) for _ in range(40)]
        rows.insert(6, '{"text": "no closing brace"')
        self.good += 40
        self.expected["nested/b.jsonl.gz:7"] = ("malformed JSON", 1)
        with gzip.open(root / "nested" / "b.jsonl.gz", "wt") as f:
            f.write("\n".join(rows) + "\n")
        # docs/*.txt: one document per file, one of them empty
        (root / "docs").mkdir()
        for i in range(30):
            (root / "docs" / f"{i:02d}.txt").write_text(document(rng, sentences=8))
        self.good += 30
        (root / "docs" / "empty.txt").write_text("\n  \n")
        self.expected["docs/empty.txt"] = ("empty file", 1)
        # c.parquet: a null and an empty value; d.parquet: no text column (its 5 rows all count)
        texts = [document(rng) for _ in range(80)]
        texts[49], texts[59] = None, "   "
        pq.write_table(pa.table({"text": texts}), root / "c.parquet")
        self.good += 78
        self.expected["c.parquet:row 50"] = ("is null", 1)
        self.expected["c.parquet:row 60"] = ("is empty", 1)
        pq.write_table(pa.table({"content": [document(rng) for _ in range(5)]}), root / "d.parquet")
        self.expected["d.parquet"] = ("no column 'text'", 5)
        # never read: a hidden folder and a file of another format
        (root / ".cache").mkdir()
        (root / ".cache" / "junk.jsonl").write_text("{broken\n")
        (root / "notes.md").write_text("# not a corpus file\n")

    @property
    def malformed(self) -> int:
        return sum(rows for _, rows in self.expected.values())

    @property
    def rows(self) -> int:
        return self.good + self.malformed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("own") / "corpus")


def own_pipeline(corpus: Corpus, data_dir: Path, **settings) -> TextPipeline:
    """The flagship's data config with `path` set, as `data.path=...` sets it."""
    config = stdlib_corpus(vocab_size=300, data_dir=str(data_dir))
    config.path = str(corpus.root)
    for name, value in settings.items():
        setattr(config, name, value)
    return fdl.build(config)


def relative(record: dict, root: Path) -> str:
    return record["where"].removeprefix(f"{root}/")


def test_every_malformed_kind_is_skipped_counted_and_listed_with_file_and_line(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # local files never go through `datasets` (or the hub)
    pipeline = own_pipeline(corpus, tmp_path / "data")
    out = io.StringIO()
    report = pipeline.prepare(console=Console(file=out, width=400))
    (collect,) = [r for r in report if r.stage == "collect"]
    assert (collect.domain, collect.docs_in, collect.docs_out, collect.malformed) == \
        ("text", corpus.rows, corpus.good, corpus.malformed)
    records = [json.loads(line) for line in
               (pipeline.folder / "rejects" / "text.malformed.jsonl").read_text().splitlines()]
    found = {relative(r, corpus.root): r for r in records}
    assert sorted(found) == sorted(corpus.expected)
    for where, (phrase, rows) in corpus.expected.items():
        assert phrase in found[where]["reason"], (where, found[where]["reason"])
        assert found[where]["rows"] == rows
    assert found["a.jsonl:3"]["excerpt"] == '{"text": "unterminated'
    summary = out.getvalue()
    assert f"{corpus.rows:,} rows read" in summary
    assert f"{corpus.malformed} malformed rows skipped (a.jsonl 8, d.parquet 5, c.parquet 2" in summary
    assert str(pipeline.folder / "rejects" / "text.malformed.jsonl") in summary
    # the rest of the chain ran on the good rows: cleaning, dedup, a 300-id BPE, both splits tokenized
    assert {r.stage for r in report} >= {"clean: RegexClean", "dedup", "tokenize (train)", "tokenize (val)"}
    assert pipeline.encoding().n_vocab == 300 and pipeline.store.size("text", "train") > 10_000


def test_strict_mode_stops_at_the_first_malformed_row_naming_file_and_line(corpus, tmp_path):
    first = re.escape(f"{corpus.root}/a.jsonl:3: malformed JSON")
    with pytest.raises(MalformedRowError, match=first + ".*data.strict=False"):
        own_pipeline(corpus, tmp_path / "data", strict=True).prepare()
    # a copy prepared leniently does not let strict mode through either
    own_pipeline(corpus, tmp_path / "data").prepare(console=Console(file=io.StringIO()))
    with pytest.raises(MalformedRowError, match=first):
        own_pipeline(corpus, tmp_path / "data", strict=True).prepare()


def test_huge_rows_are_kept_up_to_the_limit_and_rejected_past_it_without_crashing(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "socket", lambda *a, **k: pytest.fail("a local file reached for the network"))
    rng = random.Random(1)
    big = " ".join(document(rng, sentences=1) for _ in range(30_000))  # ~2.5 MB on one line
    huge = big + " " + big  # ~5 MB
    rows = [{"text": document(rng)}, {"text": big}, {"text": huge}, {"text": document(rng)}]
    (tmp_path / "big.jsonl").write_text("\n".join(json.dumps(r) for r in rows))  # no final newline
    (tmp_path / "huge.txt").write_text(huge)
    limit = len(big) + 100
    out = list(LocalFiles(path=str(tmp_path), domain="text", max_row_bytes=limit).rows())
    docs = [r for r in out if isinstance(r, Document)]
    bad = {r.where.removeprefix(f"{tmp_path}/"): r for r in out if isinstance(r, MalformedRow)}
    assert [d.text for d in docs] == [rows[0]["text"], big, rows[3]["text"]]
    assert sorted(bad) == ["big.jsonl:3", "huge.txt"]
    for row in bad.values():
        assert f"over max_row_bytes={limit:,}" in row.reason and row.nbytes >= len(huge)
    # the kept multi-MB row goes through the whole pipeline
    pipeline = TextPipeline(path=str(tmp_path / "big.jsonl"), vocab_size=300, val_fraction=0.3,
                            data_dir=str(tmp_path / "data"), progress=False)
    report = pipeline.prepare()
    assert sum(r.tokens for r in report if r.tokens) > len(big) / 8


def test_the_cache_key_follows_the_corpus_folder_and_its_contents(corpus, tmp_path):
    stdlib = fdl.build(stdlib_corpus(vocab_size=300, data_dir=str(tmp_path))).fingerprint()
    own = own_pipeline(corpus, tmp_path).fingerprint()
    assert own != stdlib and own_pipeline(corpus, tmp_path).fingerprint() == own
    copy = tmp_path / "copy"
    shutil.copytree(corpus.root, copy)
    moved = stdlib_corpus(vocab_size=300, data_dir=str(tmp_path))
    moved.path = str(copy)
    before = fdl.build(moved).fingerprint()
    assert before != own  # the same files elsewhere: another corpus
    with (copy / "a.jsonl").open("a") as f:
        f.write(json.dumps({"text": "one more row"}) + "\n")
    assert fdl.build(moved).fingerprint() != before  # edited in place: prepared anew


def run(*args: str, cwd: Path, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = ["-m", "tessera.cli.prepare", "deepseek_pretrain"] if module else \
        [str(ROOT / "recipes" / "deepseek_pretrain.py")]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_flagship_trains_on_a_folder_from_the_command_line(corpus, tmp_path):
    result = run(f"data.path={corpus.root}", "data.vocab_size=300", "steps=2", "batch_size=2", "seq_len=32",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prepared = re.search(r"data: prepared (\S+): ([\d,]+) rows read, ([\d,]+) documents kept .*?; "
                         r"(\d+) malformed rows skipped \(a\.jsonl 8", result.stdout)
    assert prepared, result.stdout
    folder, rows, kept, skipped = prepared.groups()
    assert int(rows.replace(",", "")) == corpus.rows and int(skipped) == corpus.malformed
    assert 0 < int(kept.replace(",", "")) <= corpus.good
    done = re.search(r"done: loss ([\d.]+) -> ([\d.]+) \(val ([\d.]+)\) in 2 steps", result.stdout)
    assert done, result.stdout[-2000:]
    rejects = (tmp_path / folder / "rejects" / "text.malformed.jsonl").read_text()
    assert {relative(json.loads(line), corpus.root) for line in rejects.splitlines()} == set(corpus.expected)
    # strict, preparing afresh: stops with the first malformed row's file and line
    strict = run(f"data.path={corpus.root}", "data.vocab_size=300", "data.strict=True", "--force", cwd=tmp_path,
                 module=True)
    assert strict.returncode == 1
    assert f"error: {corpus.root}/a.jsonl:3: malformed JSON: Unterminated string" in strict.stdout, strict.stdout
    # the recipe itself in strict mode: the same file and line, no traceback, a non-zero exit
    recipe = run(f"data.path={corpus.root}", "data.vocab_size=300", "data.strict=True", "steps=2", cwd=tmp_path)
    assert recipe.returncode == 4, recipe.stderr[-2000:]
    assert f"data error: {corpus.root}/a.jsonl:3:" in recipe.stderr and "Traceback" not in recipe.stderr, recipe.stderr


def test_one_text_file_splits_into_paragraphs_or_lines_located_by_line(tmp_path):
    rng = random.Random(2)
    paragraphs = [document(rng, sentences=2).replace(". ", ".\n") for _ in range(40)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    starts, line = [], 1
    for paragraph in paragraphs:  # the line each paragraph starts on, counted independently
        starts.append(line)
        line += paragraph.count("\n") + 2
    rows = list(LocalFiles(path=str(tmp_path / "book.txt"), domain="text", txt_split="paragraph").rows())
    assert [r.text for r in rows] == paragraphs
    assert [r.source for r in rows] == [f"{tmp_path / 'book.txt'}:{n}" for n in starts]
    lines = list(LocalFiles(path=str(tmp_path / "book.txt"), domain="text", txt_split="line").rows())
    assert [r.text for r in lines] == [x for p in paragraphs for x in p.split("\n")]
    with pytest.raises(ValueError, match="1 document.*data.txt_split=paragraph"):
        TextPipeline(path=str(tmp_path / "book.txt"), vocab_size=300, data_dir=str(tmp_path / "d"),
                     progress=False).prepare()
    split = TextPipeline(path=str(tmp_path / "book.txt"), txt_split="paragraph", vocab_size=300, val_fraction=0.1,
                         data_dir=str(tmp_path / "d"), progress=False)
    split.prepare()
    assert split.store.index["arrays"]["text.train"]["documents"] + \
        split.store.index["arrays"]["text.val"]["documents"] == len(paragraphs)
