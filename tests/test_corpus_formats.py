"""Corpus formats beyond plain files: Zstandard-compressed txt / jsonl / json, folders written by
`datasets`' save_to_disk (a Dataset or one split of a DatasetDict, read from their Arrow files),
damaged compressed or Arrow files counted instead of raised, the files as shards, and a hub
dataset that cannot be reached offline naming the way to a local copy."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import zstandard

from tessera.components.data.document import Document
from tessera.components.data.sources.files import HubDataset, HubUnreachableError, LocalFiles
from tessera.components.data.sources.rows import MalformedRow

from helpers.launch import ROOT

WORDS = ["amber", "quill", "torrent", "lattice", "meadow", "cinder", "harbor", "vellum", "orbit", "thistle",
         "gossamer", "pylon", "saffron", "wicket", "zephyr", "bramble"]


def texts(n: int, seed: int) -> list[str]:
    """`n` distinct one-line texts of invented sentences."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for i in range(n)]


def zstd_frames(*parts: bytes) -> bytes:
    """`parts` compressed as consecutive Zstandard frames: the first with its size in the header
    (one-shot), the rest without (streamed), as concatenated `zstd` outputs are."""
    out = [zstandard.ZstdCompressor().compress(parts[0])]
    for part in parts[1:]:
        sink = io.BytesIO()
        with zstandard.ZstdCompressor(write_checksum=True).stream_writer(sink, closefd=False) as writer:
            writer.write(part)
        out.append(sink.getvalue())
    return b"".join(out)


def jsonl(rows: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(rows)).encode()


def split_rows(rows: list[Document | MalformedRow]) -> tuple[list[Document], list[MalformedRow]]:
    return [r for r in rows if isinstance(r, Document)], [r for r in rows if isinstance(r, MalformedRow)]


def save(folder: Path, columns: dict[str, list], num_shards: int = 1) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(folder), num_shards=num_shards)
    return folder


def test_zstd_files_read_like_their_plain_counterparts(tmp_path):
    lines, items, prose = texts(300, seed=1), texts(20, seed=2), "\n".join(texts(5, seed=3))
    # several frames, split mid-line: the line across the frame boundary must come out whole
    raw = jsonl(lines)
    (tmp_path / "a.jsonl.zst").write_bytes(zstd_frames(raw[:1000], raw[1000:5000], raw[5000:]))
    (tmp_path / "b.json.zst").write_bytes(zstd_frames(json.dumps([{"text": t} for t in items]).encode()))
    (tmp_path / "c.txt.zst").write_bytes(zstd_frames(prose.encode()))
    (tmp_path / "d.json.zst").write_bytes(zstd_frames(jsonl(items[:3])))  # .json holding JSON Lines
    docs, bad = split_rows(list(LocalFiles(path=str(tmp_path), domain="x").rows()))
    assert bad == []
    assert [d.text for d in docs] == lines + items + [prose] + items[:3]
    assert docs[0].source == f"{tmp_path / 'a.jsonl.zst'}:1" and docs[299].source == f"{tmp_path / 'a.jsonl.zst'}:300"
    # an oversized line inside a frame is skipped with its line number; its neighbours are kept
    big = "x" * 5000
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "e.jsonl.zst").write_bytes(zstd_frames(jsonl([lines[0], big, lines[1]])))
    docs, bad = split_rows(list(LocalFiles(path=str(tmp_path / "big"), domain="x", max_row_bytes=1000).rows()))
    assert [d.text for d in docs] == [lines[0], lines[1]]
    assert [b.where for b in bad] == [f"{tmp_path / 'big' / 'e.jsonl.zst'}:2"]
    assert "max_row_bytes=1,000" in bad[0].reason


def test_damaged_compressed_files_become_one_malformed_row_each(tmp_path):
    lines = texts(4000, seed=4)
    whole = zstd_frames(jsonl(lines))
    gz = gzip.compress(jsonl(lines))
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])  # a download cut short
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "junk.txt.zst").write_bytes(b"this was never compressed")
    (tmp_path / "junk.json.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    (tmp_path / "fine.jsonl").write_bytes(jsonl(lines[:10]))
    rows = list(LocalFiles(path=str(tmp_path), domain="x").rows())
    docs, bad = split_rows(rows)
    per_file = {Path(b.file).name: b for b in bad}
    assert sorted(per_file) == ["cut.jsonl.gz", "cut.jsonl.zst", "junk.json.gz", "junk.txt.zst"]
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        read = [d.text for d in docs if d.source.startswith(str(tmp_path / name) + ":")]
        assert 0 < len(read) < len(lines) and read == lines[: len(read)]  # every row before the damage, intact
        assert per_file[name].where == str(tmp_path / name)
        assert f"after {len(read):,} rows, the rest of the file is skipped" in per_file[name].reason
    assert "not readable as Zstandard data" in per_file["junk.txt.zst"].reason
    assert "not readable as gzip data" in per_file["junk.json.gz"].reason
    assert all("the file is skipped" in per_file[n].reason for n in ("junk.txt.zst", "junk.json.gz"))
    assert all(b.rows == 1 and b.line is None for b in bad)  # counted once each, standing for the file's rest
    assert [d.text for d in docs if d.source.startswith(str(tmp_path / "fine.jsonl"))] == lines[:10]


def test_a_save_to_disk_folder_is_read_from_its_arrow_files_never_its_metadata(tmp_path):
    written = texts(50, seed=5)
    corpus = tmp_path / "corpus"
    save(corpus / "saved", {"text": written, "score": list(range(50))}, num_shards=3)
    (corpus / "notes.jsonl").write_bytes(jsonl(["a sibling file is read as well"]))
    for path in (corpus, corpus / "saved"):
        source = LocalFiles(path=str(path), domain="x")
        docs, bad = split_rows(list(source.rows()))
        assert bad == []  # state.json / dataset_info.json are metadata, not rows
        arrow = [s for s in source.shards() if s.endswith(".arrow")]
        assert [Path(s).name for s in arrow] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
        assert [d.text for d in docs if d.source.split(":")[0] in arrow] == written
    assert docs[0].source == f"{corpus / 'saved' / 'data-00000-of-00003.arrow'}:row 1"


def test_malformed_arrow_rows_are_counted_with_file_and_row(tmp_path):
    written: list[str | None] = texts(30, seed=6)
    written[4], written[9], written[14] = None, "   ", "y" * 3000
    save(tmp_path / "bad_rows", {"text": written})
    save(tmp_path / "no_text", {"body": texts(7, seed=7)})
    save(tmp_path / "numbers", {"text": list(range(5))})
    rows = list(LocalFiles(path=str(tmp_path), domain="x", max_row_bytes=2000).rows())
    docs, bad = split_rows(rows)
    arrow = tmp_path / "bad_rows" / "data-00000-of-00001.arrow"
    assert [d.text for d in docs] == [t for i, t in enumerate(written) if i not in (4, 9, 14)]
    found = {b.where.removeprefix(f"{tmp_path}/"): (b.reason, b.rows) for b in bad}
    assert sorted(found) == ["bad_rows/data-00000-of-00001.arrow:row 10", "bad_rows/data-00000-of-00001.arrow:row 15",
                             "bad_rows/data-00000-of-00001.arrow:row 5", "no_text/data-00000-of-00001.arrow",
                             "numbers/data-00000-of-00001.arrow"]
    assert "is null" in found[f"{arrow.relative_to(tmp_path)}:row 5"][0]
    assert "is empty" in found[f"{arrow.relative_to(tmp_path)}:row 10"][0]
    assert "over max_row_bytes=2,000" in found[f"{arrow.relative_to(tmp_path)}:row 15"][0]
    assert found["no_text/data-00000-of-00001.arrow"] == \
        ("no column 'text' (columns: 'body'); set text_field to the text column", 7)  # all of its rows
    assert "holds int64, not strings" in found["numbers/data-00000-of-00001.arrow"][0]


def test_arrow_file_format_is_read_and_a_cut_arrow_file_counted(tmp_path):
    written = texts(3000, seed=8)
    folder = save(tmp_path / "saved", {"text": written})
    arrow = folder / "data-00000-of-00001.arrow"
    table = ipc.open_stream(pa.BufferReader(arrow.read_bytes())).read_all()  # a copy: the file is rewritten below
    # the random-access file format, as pyarrow writes it, in place of datasets' stream format
    with ipc.new_file(str(arrow), table.schema) as writer:
        writer.write_table(table, max_chunksize=500)
    assert [d.text for d in LocalFiles(path=str(folder), domain="x").rows()] == written
    # a stream cut short: the batches before the cut, then one row for the rest of the file
    with ipc.new_stream(str(arrow), table.schema) as writer:
        writer.write_table(table, max_chunksize=500)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    docs, bad = split_rows(list(LocalFiles(path=str(folder), domain="x").rows()))
    assert 0 < len(docs) < len(written) and [d.text for d in docs] == written[: len(docs)]
    assert [(b.where, b.rows) for b in bad] == [(str(arrow), 1)]
    assert "not readable as an Arrow IPC file" in bad[0].reason and "the rest of the file is skipped" in bad[0].reason


def test_a_dataset_dict_folder_reads_the_split_asked_for(tmp_path):
    import datasets

    train, validation = texts(12, seed=9), texts(4, seed=10)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": validation})}).save_to_disk(
        str(tmp_path / "dd"))
    assert [d.text for d in LocalFiles(path=str(tmp_path), domain="x").rows()] == train
    picked = LocalFiles(path=str(tmp_path / "dd"), domain="x", split="validation")
    assert [d.text for d in picked.rows()] == validation
    assert picked.shards() == [str(tmp_path / "dd" / "validation" / "data-00000-of-00001.arrow")]
    with pytest.raises(FileNotFoundError, match=r"without a split 'test' \(its splits: 'train', 'validation'\); "
                                                r"set the field split of local_files"):
        LocalFiles(path=str(tmp_path / "dd"), domain="x", split="test").files()


def test_shards_are_the_files_read_in_order_and_keep_the_signature(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("a whole file is one document")
    (tmp_path / "a.jsonl.zst").write_bytes(zstd_frames(jsonl(texts(3, seed=11))))
    save(tmp_path / "c", {"text": texts(5, seed=12)}, num_shards=2)
    (tmp_path / "ignored.csv").write_text("text\nnot a corpus format\n")
    source = LocalFiles(path=str(tmp_path), domain="x")
    shards = source.shards()
    assert shards == [str(f) for f in source.files()] == sorted(shards)
    assert [Path(s).relative_to(tmp_path).as_posix() for s in shards] == \
        ["a.jsonl.zst", "b/one.txt", "c/data-00000-of-00002.arrow", "c/data-00001-of-00002.arrow"]
    assert [r for s in shards for r in source.shard_rows(s)] == list(source.rows())
    with pytest.raises(ValueError, match="not one of its shards"):
        source.shard_rows(str(tmp_path.parent / "elsewhere.jsonl"))
    before = source.content_signature()
    save(tmp_path / "c", {"text": texts(6, seed=13)}, num_shards=2)  # the arrow files rewritten
    assert source.content_signature() != before
    with pytest.raises(FileNotFoundError, match=r"not a txt / jsonl / json / parquet file \(optionally .gz or .zst\)"):
        LocalFiles(path=str(tmp_path / "ignored.csv"), domain="x").files()


def test_an_unreachable_hub_dataset_says_how_to_use_a_local_copy(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # both libraries read the variable once, at import: set their copies too, so nothing goes to the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        list(HubDataset(name="tessera-tests/never-published", domain="web").rows())
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert isinstance(raised.value, HubUnreachableError)
    assert "hub dataset 'tessera-tests/never-published' (source 'web') could not be reached (offline?" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert ".save_to_disk('DIR')" in message and "data.path=DIR" in message


def _train(path: str, cwd: Path, **env: str):
    """Two steps of the flagship recipe on `data.path=path`."""
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "deepseek_pretrain.py"), f"data.path={path}",
                           "data.vocab_size=300", "steps=2", "batch_size=2", "seq_len=32", "validation.batches=1"],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env})


@pytest.mark.slow
def test_the_flagship_trains_from_a_save_to_disk_folder_and_a_zst_file(tmp_path):
    import datasets

    rows = texts(120, seed=7)
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in rows).encode()))
    for path in (tmp_path / "saved", tmp_path / "corpus.jsonl.zst"):
        result = _train(str(path), tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"{len(rows):,} rows read" in result.stdout and "0 malformed rows" in result.stdout, result.stdout
        assert "done: loss" in result.stdout, result.stdout[-2000:]


def test_a_hub_dataset_by_name_offline_ends_in_the_fix_not_a_traceback(tmp_path):
    result = _train("hub:someone/some-corpus", tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    assert "someone/some-corpus" in result.stderr and "save_to_disk" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
