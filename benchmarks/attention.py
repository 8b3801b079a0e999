"""Forward+backward time and peak memory of every attention variant, relative to dense SDPA.

    python benchmarks/attention.py [--seqs 512 2048 8192] [--dtypes float32 bfloat16] [--repeats 2]

Each (variant, sequence length, dtype) runs in a fresh subprocess pinned to one thread, so
the peak-RSS reading belongs to that case alone: peak memory is the growth of the process's
maximum resident set over its size just before the first forward+backward. Time is the best
of `--repeats` timed forward+backward passes after that first (warm-up) pass. FlexAttention
has no CPU backward in torch 2.13, so its row is forward-only (compiled, marked "fwd").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, HEADS, KV_HEADS, BATCH = 512, 8, 8, 1

VARIANTS = {
    "sdpa_dense": "GroupedQueryAttention(dim=D, n_heads=H, n_kv_heads=KV, position=RoPE())",
    "sliding_window_256": "SlidingWindowAttention(dim=D, n_heads=H, n_kv_heads=KV, window=256, position=RoPE())",
    "block_sparse_gather": "BlockSparseAttention(dim=D, n_heads=H, n_kv_heads=KV, block_size=128, local_blocks=2,"
                           " global_blocks=1, position=RoPE())",
    "block_sparse_flex": "BlockSparseAttention(dim=D, n_heads=H, n_kv_heads=KV, block_size=128, local_blocks=2,"
                         " global_blocks=1, backend='flex', position=RoPE())",
    "linear_chunk64": "LinearAttention(dim=D, n_heads=H, chunk_size=64)",
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(variant: str, seq: int, dtype_name: str, repeats: int) -> dict[str, float | str]:
    """One measurement, in this process (called inside the per-case subprocess)."""
    import torch

    from tessera.components.attention.block_sparse import BlockSparseAttention
    from tessera.components.attention.gqa import GroupedQueryAttention
    from tessera.components.attention.linear import LinearAttention
    from tessera.components.attention.sliding_window import SlidingWindowAttention
    from tessera.components.position.rope import RoPE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    names = dict(GroupedQueryAttention=GroupedQueryAttention, SlidingWindowAttention=SlidingWindowAttention,
                 BlockSparseAttention=BlockSparseAttention, LinearAttention=LinearAttention, RoPE=RoPE,
                 D=DIM, H=HEADS, KV=KV_HEADS)
    module = eval(VARIANTS[variant], names).to(dtype)  # noqa: S307 - fixed strings above
    x = torch.randn(BATCH, seq, DIM, dtype=dtype, requires_grad=True)
    forward_only = variant.endswith("flex")

    def step() -> None:
        if forward_only:
            with torch.no_grad():
                module(x)
            return
        module(x).float().square().mean().backward()
        x.grad = None
        module.zero_grad(set_to_none=True)

    before = _rss_bytes()
    step()  # warm-up: allocator growth, compilation for the flex backend
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "seq": seq, "dtype": dtype_name, "seconds": min(times),
            "peak_mb": max(0.0, peak / 2**20), "mode": "fwd" if forward_only else "fwd+bwd"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--case", nargs=3, metavar=("VARIANT", "SEQ", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        variant, seq, dtype = args.case
        print(json.dumps(run_case(variant, int(seq), dtype, args.repeats)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for dtype in args.dtypes:
        for seq in args.seqs:
            for variant in args.variants:
                proc = subprocess.run([sys.executable, __file__, "--case", variant, str(seq), dtype,
                                       "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    rows.append({"variant": variant, "seq": seq, "dtype": dtype, "error": proc.stderr.strip()[-200:]})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr)
    table = Table(title=f"attention forward+backward, B={BATCH}, D={DIM}, H={HEADS}, 1 thread, CPU")
    for col in ("dtype", "seq", "variant", "mode", "time (ms)", "x dense", "peak MB", "x dense mem"):
        table.add_column(col, justify="right")
    for row in rows:
        dense = next((r for r in rows if r["variant"] == "sdpa_dense" and r["seq"] == row["seq"]
                      and r["dtype"] == row["dtype"] and "seconds" in r), None)
        if "error" in row:
            table.add_row(row["dtype"], str(row["seq"]), row["variant"], "-", "error", "-", "-", row["error"][:40])
            continue
        rel_t = f"{row['seconds'] / dense['seconds']:.2f}" if dense else "-"
        rel_m = f"{row['peak_mb'] / dense['peak_mb']:.2f}" if dense and dense["peak_mb"] > 0 else "-"
        table.add_row(row["dtype"], str(row["seq"]), row["variant"], row["mode"], f"{row['seconds'] * 1e3:.1f}",
                      rel_t, f"{row['peak_mb']:.0f}", rel_m)
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
