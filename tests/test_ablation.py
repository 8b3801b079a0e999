"""The ablation recipe's --quick mode, run as a user would: table, picture, skipped cells, budget."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from helpers.launch import run_recipe

COLUMNS = ["attention", "position", "feed-forward", "FFN width", "params total", "params activated",
           "train FLOPs/token", "params vs budget", "val bits/byte", "tokens/s", "peak memory MiB",
           "memory over start MiB"]
TRAINED = {("mha", "rope", "swiglu"), ("mha", "rope", "moe"), ("gqa", "alibi", "mlp"), ("linear", "nope", "swiglu")}
# Combinations the components' own rules forbid: MLA's decoupled key takes only RoPE, linear
# attention only NoPE, block-sparse attention no additive bias.
SKIPPED = {"mla/alibi/swiglu": "MultiHeadLatentAttention", "linear/rope/swiglu": "LinearAttention",
           "block_sparse/alibi/mlp": "BlockSparseAttention"}
TOLERANCE = 0.03  # the recipe's default --tolerance


def _block_params(attention: str, ffn: str, width: int, *, dim: int, heads: int, n_routed: int,
                  n_shared: int) -> int:
    """Parameters of one block written out by hand: projections, feed-forward, two RMSNorms."""
    head_dim = dim // heads
    kv = dim if attention != "gqa" else (heads // 2) * head_dim  # the recipe's GQA: two query heads per kv head
    attn = 2 * dim * dim + 2 * dim * kv
    if ffn == "swiglu":
        ff = 3 * dim * width
    elif ffn == "mlp":
        ff = 2 * dim * width
    else:  # router + routed experts + shared experts, each a SwiGLU of `width`
        ff = dim * n_routed + 3 * dim * width * (n_routed + n_shared)
    return attn + ff + 2 * dim


def _number(text: str) -> float:
    """The leading number of a table entry ("0.316M", "+0.12%", "12,345", "3.54 ± 0.01")."""
    match = re.match(r"[+-]?[\d,]*\.?\d+", text.strip())
    assert match, f"no number in table entry {text!r}"
    return float(match.group().replace(",", ""))


def test_quick_ablation_writes_table_and_picture_at_equal_params(tmp_path: Path):
    out = tmp_path / "ablation"
    done = run_recipe("--quick", "--match", "params", "--threads", "1", "--out", str(out), recipe="ablation",
                      timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "wrote" in done.stdout
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "ablation.md").read_text()
    results = json.loads((out / "results.json").read_text())
    scale = results["scale"]

    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert {tuple(r[:3]) for r in rows} == TRAINED
    for row in rows:
        values = {name: _number(entry) for name, entry in zip(COLUMNS[3:], row[3:])}
        assert all(math.isfinite(v) for v in values.values()), row
        assert 0 < values["val bits/byte"] < 8, row  # a byte has 8 bits: above that the model learnt nothing
        assert values["tokens/s"] > 0 and values["peak memory MiB"] > 0, row

    # Every cell's block parameters, recomputed from its FFN width by hand, meet the reference's budget.
    sizes = {}
    for row in rows:
        attention, _, ffn = row[:3]
        one = _block_params(attention, ffn, int(row[3]), dim=scale["dim"], heads=scale["n_heads"],
                            n_routed=scale["n_routed"], n_shared=scale["n_shared"])
        sizes[tuple(row[:3])] = one * scale["n_layers"]
    budget = sizes[("mha", "rope", "swiglu")]
    assert budget == results["reference"]["block_params"]
    embedding_and_head = 2 * scale["vocab_size"] * scale["dim"] + scale["dim"]  # untied, plus the final norm
    for row in rows:
        block = sizes[tuple(row[:3])]
        assert abs(block / budget - 1) <= TOLERANCE, (row, block, budget)
        assert abs(_number(row[4]) * 1e6 - (block + embedding_and_head)) <= 500, row  # shown rounded to 1k
    moe = next(r for r in rows if r[2] == "moe")
    assert _number(moe[5]) < _number(moe[4])  # routed experts idle per token: activated < total

    skipped = dict(re.findall(r"^- (\S+): (.+)$", table.split("## Skipped")[1].split("##")[0], flags=re.M))
    assert set(skipped) == set(SKIPPED)
    for name, component in SKIPPED.items():
        assert component in skipped[name] and "supported_positions" in skipped[name], skipped[name]
