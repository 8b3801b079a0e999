"""Training throughput and MFU of our DeepSeek model against transformers' DeepseekV3ForCausalLM.

    python benchmarks/train_throughput.py [--dim 512] [--layers 4] [--batch 4] [--seq 512] [--steps 5]
    python benchmarks/train_throughput.py dense [--no-compile]   # the dense d=512 table (llama_throughput.py)

Both models are built from one HF DeepseekV3 config and hold the same weights (ours loaded
through `components.model.hf_deepseek`), so they compute the same function; each runs full
training steps (forward, backward, AdamW step) under the same precision, side by side in
this one process, one thread. MFU divides achieved FLOP/s (FLOPs per token from
`components.model.stats`, attention included, MTP off since transformers has none) by the
machine's matmul peak measured here for that dtype. A second table compares one MoE layer
with a dense SwiGLU of equal activated FLOPs (hidden = (top_k + n_shared) * expert width).
torchtitan's DeepSeek-V3 is not in the table: its models import triton, absent on CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import hf_causal_lm_loss, tessera_loss, training_step_seconds  # noqa: E402
from components.mlp.gated import SwiGLU  # noqa: E402
from components.model import stats  # noqa: E402
from components.model.hf_deepseek import load_pretrained  # noqa: E402
from components.train.metrics import measure_matmul_peak  # noqa: E402


def hf_config(args: argparse.Namespace):
    """A transformers DeepseekV3 config with the dimensions of our `debug` preset (or `--dim` etc.)."""
    import transformers

    return transformers.DeepseekV3Config(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=3 * args.dim, moe_intermediate_size=3 * args.dim // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        n_shared_experts=1, n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=args.groups,
        topk_group=args.topk_groups,
        routed_scaling_factor=1.0, norm_topk_prob=True, q_lora_rank=args.dim // 2, kv_lora_rank=args.dim // 4,
        qk_nope_head_dim=args.dim // args.heads, qk_rope_head_dim=args.dim // args.heads // 2,
        v_head_dim=args.dim // args.heads, first_k_dense_replace=1, max_position_embeddings=max(args.seq, 128),
        rope_interleave=True, num_nextn_predict_layers=0)


def main() -> None:
    if sys.argv[1:2] == ["dense"]:  # the dense model's table lives in its own file
        from benchmarks.llama_throughput import main as dense

        return dense(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: the deepseek_pretrain `debug` preset (dim 128, 4 layers, 4 MLA heads, 8 experts top-2
    # + 1 shared, byte vocabulary, 16 x 128 tokens per step).
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--topk-groups", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers
    from rich.console import Console
    from rich.table import Table

    config = hf_config(args)
    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = load_pretrained(tmp)
    ours.train()
    theirs.train()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    n_tokens = args.batch * args.seq
    flops_per_token = stats.training_flops_per_token(ours, args.seq)
    console = Console(width=150)
    table = Table(title=f"training step, DeepSeek-V3-style dim {args.dim}, {args.layers} layers, {args.experts} experts "
                        f"top-{args.top_k} +1 shared, batch {args.batch} x {args.seq}, 1 thread, CPU")
    for col in ("precision", "model", "s/step", "tokens/s", "x transformers", "MFU", "matmul peak GFLOP/s"):
        table.add_column(col, justify="right")
    for name, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        peak = measure_matmul_peak(dtype or torch.float32)
        t_ours = training_step_seconds(ours, tessera_loss, tokens, dtype, args.steps)
        t_hf = training_step_seconds(theirs, hf_causal_lm_loss, tokens, dtype, args.steps)
        for model_name, seconds in (("tessera", t_ours), ("transformers", t_hf)):
            table.add_row(name, model_name, f"{seconds:.3f}", f"{n_tokens / seconds:,.0f}", f"{t_hf / seconds:.2f}",
                          f"{flops_per_token * n_tokens / seconds / peak:.1%}", f"{peak / 1e9:,.1f}")
    console.print(table)

    # One MoE layer against a dense SwiGLU with the same activated FLOPs.
    moe = ours.layers[1].feed_forward
    width = (moe.router.top_k + 1) * moe.experts.hidden_dim
    dense = SwiGLU(dim=args.dim, hidden_dim=width)
    x = torch.randn(args.batch, args.seq, args.dim)
    layer_table = Table(title="MoE layer vs dense SwiGLU of equal activated FLOPs (forward+backward)")
    for col in ("precision", "MoE ms", "dense ms", "MoE / dense"):
        layer_table.add_column(col, justify="right")
    for name, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        times = {}
        for label, module in (("moe", moe), ("dense", dense)):
            ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext
            best = float("inf")
            for i in range(args.steps + 1):
                xi = x.clone().requires_grad_()
                start = time.perf_counter()
                with ctx():
                    out = module(xi)
                out.float().square().mean().backward()
                if i:
                    best = min(best, time.perf_counter() - start)
            times[label] = best
        layer_table.add_row(name, f"{times['moe'] * 1e3:.1f}", f"{times['dense'] * 1e3:.1f}",
                            f"{times['moe'] / times['dense']:.2f}")
    console.print(layer_table)


if __name__ == "__main__":
    main()
