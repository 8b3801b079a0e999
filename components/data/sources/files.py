"""Documents from local files (txt, jsonl, json, parquet, datasets' save_to_disk folders) and
from Hugging Face hub datasets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tessera.components.data.document import Document
from tessera.components.data.sources.readers import ARROW, SUFFIXES, TxtSplit, file_format, read_rows
from tessera.components.data.sources.rows import MalformedRow, RowSource
from tessera.registry.kinds import DATA_SOURCE

_KINDS = " / ".join(s[1:] for s in SUFFIXES)


def _on_this_process() -> str:
    """Under torchrun (WORLD_SIZE > 1): which process and host could not see a path, and that
    every process reads it (so it must exist on every node); "" in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return ""
    return (f" on rank {os.environ.get('RANK', '?')} of {world} (host {socket.gethostname()}): every process reads "
            f"the corpus, so the path must exist on every node: put it on a file system all nodes share, or copy "
            f"it to the same path on each")


@DATA_SOURCE.register("local_files")
@dataclasses.dataclass(kw_only=True)
class LocalFiles(RowSource):
    """Every corpus file under `path` (a file or a folder, searched recursively, hidden files
    and folders skipped), in sorted order. Read here, never over the network.

    txt: one document per file, or per paragraph / line with `txt_split` (invalid UTF-8
    replaced and counted); jsonl: one per line, the text in `text_field`; json: an array of
    such objects, or JSON Lines; parquet: one per row of column `text_field`. `.gz` and `.zst`
    (Zstandard) files are decompressed as they are read (not parquet, compressed inside).
    A folder written by `datasets`' `Dataset.save_to_disk` (a `state.json` listing `.arrow`
    files), at `path` or anywhere under it, is read as its Arrow files, one document per row of
    column `text_field`, its json metadata never as data; of a `DatasetDict.save_to_disk`
    folder (a `dataset_dict.json` listing splits) only the split `split` is read.
    Rows that cannot be used (broken JSON, a missing, non-string or empty text, a row over
    `max_row_bytes`, the rest of a truncated or corrupt file) come out of `rows()` as
    `MalformedRow`s naming file and line. `format` restricts which files are read. Each file
    is one of `shards()`.
    """

    path: str
    domain: str
    text_field: str = "text"
    format: Literal["auto", "txt", "jsonl", "parquet", "arrow"] = "auto"
    max_row_bytes: int = 16_000_000
    txt_split: TxtSplit = "file"
    split: str = "train"

    def files(self) -> list[Path]:
        """The files read, sorted; raises FileNotFoundError when there are none (or a
        DatasetDict folder lacks the split `split`)."""
        root = Path(self.path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"local_files source {self.domain!r}: {root} does not exist (path={self.path!r})"
                                    f"{_on_this_process()}; give a {_KINDS} file (optionally .gz or .zst), a folder "
                                    f"of them, or a folder written by datasets' save_to_disk")
        if root.is_file():
            if file_format(root) is None:
                raise FileNotFoundError(f"local_files source {self.domain!r}: {root} is not a "
                                        f"{_KINDS} file (optionally .gz or .zst)")
            return [root]
        files = sorted(self._walk(root))
        if self.format != "auto":
            wanted = {"txt": {".txt"}, "jsonl": {".jsonl", ".json"}, "parquet": {".parquet"},
                      "arrow": {ARROW}}[self.format]
            files = [f for f in files if file_format(f) in wanted]
        if not files:
            raise FileNotFoundError(f"local_files source {self.domain!r}: no txt/jsonl/parquet files "
                                    f"(optionally .gz or .zst) nor save_to_disk folders under {root}")
        return files

    def _walk(self, root: Path) -> Iterator[Path]:
        """The corpus files in the folder `root`; a save_to_disk folder gives its Arrow files
        and nothing else (its json files are metadata, not rows)."""
        for folder, subfolders, names in os.walk(root):
            here = Path(folder)
            saved = _saved_dataset(here, split=self.split, domain=self.domain)
            if saved is not None:
                subfolders.clear()  # a DatasetDict's other splits, or the Dataset's own files, are not read
                yield from saved
                continue
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            for name in names:
                file = here / name
                # a loose .arrow file (a datasets cache, say) is not known to be a corpus: only save_to_disk's
                if not name.startswith(".") and file_format(file) not in (None, ARROW) and file.is_file():
                    yield file

    def rows(self) -> Iterator[Document | MalformedRow]:
        for shard in self.shards():
            yield from self.shard_rows(shard)

    def shards(self) -> list[str]:
        """The files read (`files()`, as strings, in the same order): each is read on its own."""
        return [str(file) for file in self.files()]

    def shard_rows(self, shard: str) -> Iterator[Document | MalformedRow]:
        """The rows of the file `shard`, one of `shards()`; raises ValueError for a file that is
        not under `path` or not of a format read."""
        file = Path(shard)
        root = os.path.abspath(Path(self.path).expanduser())
        inside = os.path.abspath(file) == root or os.path.abspath(file).startswith(root.rstrip(os.sep) + os.sep)
        if not inside or file_format(file) is None:
            raise ValueError(f"local_files source {self.domain!r}: {shard!r} is not one of its shards "
                             f"(the files under {self.path!r} it reads)")
        return read_rows(file, domain=self.domain, text_field=self.text_field,
                         max_row_bytes=self.max_row_bytes, txt_split=self.txt_split)

    def content_signature(self) -> str:
        """A hash of every file's absolute path, size and modification time: a file edited,
        added or removed (or the same relative path from another folder) changes it."""
        digest = hashlib.sha256()
        for file in self.files():
            stat = file.stat()
            digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


def _read_json(path: Path) -> object:
    """The JSON value in `path`, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _saved_dataset(folder: Path, *, split: str, domain: str) -> list[Path] | None:
    """The Arrow files of `folder` when `datasets`' save_to_disk wrote it (of the split `split`
    for a DatasetDict), else None. Raises FileNotFoundError for a DatasetDict without `split`."""
    listed = _read_json(folder / "dataset_dict.json")
    if isinstance(listed, dict) and isinstance(listed.get("splits"), list):
        splits = [str(name) for name in listed["splits"]]
        files = _dataset_files(folder / split) if split in splits else None
        if files is None:
            available = ", ".join(map(repr, splits)) or "none"
            raise FileNotFoundError(
                f"local_files source {domain!r}: {folder} is a DatasetDict saved by datasets' save_to_disk "
                f"without a split {split!r} (its splits: {available}); set the field split of local_files "
                f"to the split to read")
        return files
    return _dataset_files(folder)


def _dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files listed in the `state.json` of a Dataset folder, or None when `folder`
    is not one. Raises FileNotFoundError when a listed file is missing (a partial copy)."""
    state = _read_json(folder / "state.json")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list):
        return None
    names = [entry.get("filename") for entry in entries if isinstance(entry, dict)]
    files = [folder / name for name in names if isinstance(name, str) and name.endswith(ARROW)]
    if not files:
        return None  # a state.json of something else: the folder is read as any other
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} was written by datasets' save_to_disk, but its state.json lists "
                                f"{', '.join(missing)}, which are not there (an incomplete copy?)")
    return sorted(files)


class HubUnreachableError(ConnectionError, FileNotFoundError):
    """A hub dataset could not be reached (no network, or HF_HUB_OFFLINE set). A ConnectionError;
    also a FileNotFoundError, the data this run needs not being here, so the command-line tools
    report it with its message and no traceback, as they do a missing corpus folder."""


@DATA_SOURCE.register("hub_dataset")
@dataclasses.dataclass(kw_only=True)
class HubDataset(RowSource):
    """A Hugging Face hub dataset, streamed with `datasets` (needs network): `name`, optional
    `config`, `split`, the `text_field`, and at most `max_documents` rows. Rows without a
    string text are reported as malformed (`name:split:row`). Without network (or with
    HF_HUB_OFFLINE set) `rows()` raises `HubUnreachableError`, saying how to download the
    dataset elsewhere and read it with `local_files` (`data.path=`)."""

    name: str
    domain: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int = 100_000

    def rows(self) -> Iterator[Document | MalformedRow]:
        import datasets

        read = 0
        try:  # around the first row too: a stream opens lazily, and may fail only when read
            stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            for i, row in enumerate(stream):
                if i >= self.max_documents:
                    return
                read += 1
                yield self._row(i, row)
        except Exception as err:
            if not _unreachable(err):
                raise  # a misspelt name, a missing split, ...: `datasets`' own message says it
            raise HubUnreachableError(self._unreachable_message(err, read)) from err

    def _row(self, i: int, row: dict) -> Document | MalformedRow:
        where = f"{self.name}:{self.split}:{i}"
        text = row.get(self.text_field)
        if isinstance(text, str) and text.strip():
            return Document(text=text, domain=self.domain, source=where)
        problem = "missing" if text is None else "empty" if isinstance(text, str) else \
            f"a {type(text).__name__}, not a string"
        return MalformedRow(file=self.name, where=where, line=i, reason=f"field {self.text_field!r} is {problem}")

    def _unreachable_message(self, err: BaseException, read: int) -> str:
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "is there a network here?"
        after = f" after {read:,} rows" if read else ""
        config = f", {self.config!r}" if self.config is not None else ""
        return (f"hub dataset {self.name!r} (source {self.domain!r}) could not be reached{after} (offline? {why}) "
                f"[{type(err).__name__}: {err}]. Download it where there is network, e.g. python -c \"import "
                f"datasets; datasets.load_dataset({self.name!r}{config}, split={self.split!r}).save_to_disk('DIR')\" "
                f"(or its files with the hub CLI: hf download {self.name} --repo-type dataset --local-dir DIR), "
                f"then read it from there with data.path=DIR (a local_files source with path=DIR)")


_TRUE = {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    """Whether the hub is switched off for this process (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the hub was not reached, from whichever HTTP stack is installed."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    try:
        import httpx  # huggingface_hub >= 1.0

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests  # older huggingface_hub; its ConnectionError is not the builtin one

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError  # not cached, and the hub not reached

        errors.append(LocalEntryNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def _unreachable(err: BaseException) -> bool:
    """Whether `err` (or an exception it was raised from) says the hub could not be reached;
    with the hub switched off, any OSError `datasets` raises is taken to say so."""
    network = _network_errors()
    seen: BaseException | None = err
    for _ in range(16):  # the chain of causes is short; the bound only guards against a cycle
        if seen is None:
            break
        if isinstance(seen, network):
            return True
        seen = seen.__cause__ or seen.__context__
    return _hub_offline() and isinstance(err, OSError)
