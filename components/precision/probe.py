"""Time-boxed matmul speed measurement, cached per machine, device and dtype.

Two things read it: the MFU denominator (the practical matmul peak) and precision `auto`
(is bf16 faster than fp32 here?). Both must cost a fraction of a second: on CPUs without a
native bf16 dot product (AVX2-only x86) a bf16 matmul runs ~40x slower than fp32, so a fixed
2048^3 probe there takes minutes. The probe instead grows the matrix size from 128 while the
next size is predicted to fit the time budget, and keeps the best rate seen.

Results are cached as JSON in `$TESSERA_CACHE_DIR` (default `~/.cache/tessera`), keyed by
the machine (host, CPU model), device, dtype and torch version, so a second
run on the same machine pays only a refresh of a few milliseconds. The cache keeps the best
rate ever seen: a probe that ran while other work loaded the cores (two threads sharing a
busy core run many times slower) is corrected by the next quiet one instead of lasting.
The probe draws from its own generator, never from the run's RNG stream.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)
"""Square sizes tried in order; each costs ~8x the one before."""
REFRESH_S = 0.02
"""Budget of the re-measurement when a cached rate exists."""


def cache_path() -> Path:
    """The cache file (`$TESSERA_CACHE_DIR/matmul_speed.json`, default `~/.cache/tessera`)."""
    root = os.environ.get("TESSERA_CACHE_DIR") or Path.home() / ".cache" / "tessera"
    return Path(root) / "matmul_speed.json"


def machine_key(device: str) -> str:
    """What a cached measurement is valid for: host, processor model or device name, torch."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    return f"{platform.node()}|{dev.type}|{name}|torch {torch.__version__}"


def matmul_flops(dtype: torch.dtype = torch.float32, *, device: str = "cpu", budget_s: float = 0.25,
                 cache: bool = True) -> float:
    """The practical matmul FLOP/s of `device` in `dtype`: the best rate over square matmuls
    of growing size, stopping before the next size would exceed `budget_s` seconds in all.
    With `cache`, a rate stored for this machine is refreshed with a budget of `REFRESH_S`
    only, and the better of the two is stored and returned.

    On a CPU the probe runs on one thread and the rate is multiplied by the caller's thread
    count: two threads sharing a core with other work run a matmul up to 100x slower (seen
    here), which would make one busy moment this machine's peak; one thread is slowed at
    most by the share of the core it gets."""
    key = f"{machine_key(device)}|{dtype}"
    known = _read_cache().get(key) if cache else None
    flops = _measure(dtype, device, REFRESH_S if known else budget_s)
    if known is None or flops > known:
        if cache:
            _write_cache(key, flops)
    else:
        flops = float(known)
    return flops * (torch.get_num_threads() if torch.device(device).type == "cpu" else 1)


def _measure(dtype: torch.dtype, device: str, budget_s: float) -> float:
    """Best rate seen (one thread on a CPU)."""
    if torch.device(device).type != "cpu":
        return _measure_sizes(dtype, device, budget_s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_sizes(dtype, device, budget_s)
    finally:
        torch.set_num_threads(threads)


def _measure_sizes(dtype: torch.dtype, device: str, budget_s: float) -> float:
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the run's RNG stream untouched
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    start = time.perf_counter()
    best = 0.0
    for size in SIZES:
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        a @ b  # warm-up: kernel selection, first-touch of the output
        sync()
        for _ in range(2):
            t0 = time.perf_counter()
            a @ b
            sync()
            seconds = time.perf_counter() - t0
            best = max(best, 2 * size**3 / max(seconds, 1e-9))
        # The next size costs ~8x this one per matmul, three times (warm-up + 2).
        if time.perf_counter() - start + 3 * 8 * seconds > budget_s:
            break
    return best


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache() -> dict[str, float]:
    """The stored rates; a missing, unreadable or damaged cache (not a JSON object of numbers)
    reads as empty, or without its damaged entries: it only saves time."""
    try:
        entries = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {key: float(value) for key, value in entries.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0}


def _write_cache(key: str, value: float) -> None:
    """Add one entry; atomic (write + rename) so concurrent ranks never leave a torn file.
    A cache that cannot be written (read-only home) is skipped: it only saves time."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache()
        entries[key] = value
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass
