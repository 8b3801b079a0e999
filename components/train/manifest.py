"""A checkpoint's manifest: every file's size and CRC-32, written when the checkpoint is and
checked before it is resumed from.

A full disk, an interrupted copy or a bad block leaves a checkpoint whose files are shorter
than written, or hold other bytes. torch.distributed.checkpoint then fails deep inside its
reader (or, worse, loads garbage); the manifest lets the run notice first and name the file.

CRC-32 (zlib's, streamed in 1 MiB chunks) detects every truncation, every burst error of up
to 32 bits and all but 2^-32 of other corruptions, at several GB/s on one core: it guards
against accidents, not against anyone forging a checkpoint (nothing in a checkpoint is
unpickled, so a forged one can at worst hold wrong numbers).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
_COMPLETE_TEXT = f"ok\nmanifest: {MANIFEST}\n"
"""What `COMPLETE` holds in a checkpoint with a manifest; before manifests it held "ok\\n",
which is how an older (unverifiable) checkpoint is told from one whose manifest was lost."""
_CHUNK = 1 << 20


def crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 1 MiB chunks into one reused buffer."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    value = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            value = zlib.crc32(view[:n], value)
    return value


def write(folder: Path) -> None:
    """Record every file now in `folder` (all ranks' shards, state and config) in its
    manifest, then write `COMPLETE`. Call once, on one process, after every rank's files are
    written and before the folder is renamed into place."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):  # subfolders too (the tokenizer's)
        name = path.relative_to(folder).as_posix()
        if name not in (MANIFEST, COMPLETE):
            files[name] = {"bytes": path.stat().st_size, "crc32": f"{crc32(path):08x}"}
    _write_synced(folder / MANIFEST, json.dumps({"format": 1, "checksum": "crc32", "files": files}, indent=1))
    _write_synced(folder / COMPLETE, _COMPLETE_TEXT)


@dataclass
class Verdict:
    """What `verify` found: `damage` lists one line per damaged file ("<file>: <what>");
    `verified` is False for a checkpoint written before manifests (nothing to check against)."""

    verified: bool
    damage: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.damage


def verify(folder: Path) -> Verdict:
    """Check `folder`'s files against its manifest: sizes first (free), then checksums.

    A checkpoint whose `COMPLETE` predates manifests is `verified=False` with no damage; one
    that should have a manifest but has none (or an unreadable one) is damaged.
    """
    try:
        marker = (folder / COMPLETE).read_text()
    except OSError as err:
        return Verdict(verified=False, damage=[f"{folder / COMPLETE}: unreadable ({err.strerror})"])
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        if MANIFEST not in marker:
            return Verdict(verified=False)
        return Verdict(verified=False, damage=[f"{manifest_path}: missing (the file list and checksums are gone)"])
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {name: (int(entry["bytes"]), int(entry["crc32"], 16)) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return Verdict(verified=False, damage=[f"{manifest_path}: unreadable ({type(err).__name__}: {err})"])
    damage = []
    for name, (size, _) in expected.items():
        path = folder / name
        if not path.exists():
            damage.append(f"{path}: missing (expected {size:,} bytes)")
            continue
        actual = path.stat().st_size
        if actual < size:
            damage.append(f"{path}: {actual:,} bytes, expected {size:,} (truncated)")
        elif actual > size:
            damage.append(f"{path}: {actual:,} bytes, expected {size:,} (grew after it was written)")
    if damage:  # no need to read anything: sizes already tell
        return Verdict(verified=True, damage=damage)
    for name, (_, checksum) in expected.items():
        actual = crc32(folder / name)
        if actual != checksum:
            damage.append(f"{folder / name}: bytes changed since written (crc32 {actual:08x}, expected "
                          f"{checksum:08x}; same size, corrupted in place)")
    return Verdict(verified=True, damage=damage)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
