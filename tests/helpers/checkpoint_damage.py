"""Damage a checkpoint the ways disks and copies do, for the checkpoint-integrity tests (in pytest
and in their torchrun worker)."""

from __future__ import annotations

from pathlib import Path


def flip(path: Path, offset: int) -> None:
    """Change one bit of the byte at `offset` (negative: from the end), keeping the size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def damage(checkpoint: Path, case: str) -> tuple[Path, str]:
    """Damage `checkpoint` as `case` says; returns the file named and what the warning must say."""
    shard = sorted(checkpoint.glob("*.safetensors"))[-1]
    size = shard.stat().st_size
    if case == "header":  # inside the JSON header that says where each tensor lies
        flip(shard, 20)
        return shard, "bytes changed since written"
    if case == "middle":
        flip(shard, size // 2)
        return shard, "bytes changed since written"
    if case == "last byte":
        flip(shard, -1)
        return shard, "bytes changed since written"
    if case == "truncated":  # as a full disk or an interrupted copy leaves it: header intact
        shard.write_bytes(shard.read_bytes()[: size // 2])
        return shard, f"{size // 2:,} bytes, expected {size:,} (truncated)"
    if case == "missing shard":
        shard.unlink()
        return shard, f"missing (expected {size:,} bytes)"
    if case == "missing manifest":
        (checkpoint / "MANIFEST.json").unlink()
        return checkpoint / "MANIFEST.json", "missing"
    raise ValueError(case)
