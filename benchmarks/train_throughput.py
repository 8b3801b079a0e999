"""Training throughput and MFU of our DeepSeek model against transformers' DeepseekV3ForCausalLM.

    python benchmarks/train_throughput.py [--dim 512] [--layers 4] [--batch 4] [--seq 512] [--steps 5]
    python benchmarks/train_throughput.py dense [--no-compile]   # the dense d=512 table (llama_throughput.py)
    python benchmarks/train_throughput.py moe [--dim 256 --experts 16 --top-k 4 ...] [--no-compile]  # MoE table only

Both models are built from one HF DeepseekV3 config and hold the same weights (ours loaded
through `tessera.components.families.deepseek.hf`), so they compute the same function; each runs full
training steps (forward, backward, AdamW step) under the same precision, side by side in
this one process, one thread, eager and compiled (ours: per-block torch.compile, as the
trainer's `compute.compile=True`; theirs: torch.compile of the whole model), timed interleaved
(one step of each in turn) and reported as medians. MFU divides achieved FLOP/s (FLOPs per token from
`tessera.components.model.stats`, attention included, MTP off since transformers has none) by the
machine's matmul peak measured here for that dtype. A last table compares one MoE layer
with a dense SwiGLU of equal activated FLOPs (hidden = (top_k + n_shared) * expert width),
eager and each layer compiled, and the same two as bare GEMMs (`gemm_floor`: what the MoE's
expert shapes cost before any routing). Rows in a precision this machine runs slowly (bf16
without AMX / AVX512-BF16) are skipped with the reason printed. torchtitan's DeepSeek-V3 is
not in the table: its models import triton, absent on CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import (  # noqa: E402
    allocate_as_a_run,
    fast_precisions,
    hf_causal_lm_loss,
    interleaved_medians,
    tessera_loss,
    training_step,
)
from tessera.components.families.deepseek.hf import load_pretrained  # noqa: E402
from tessera.components.mlp.gated import SwiGLU  # noqa: E402
from tessera.components.model import stats  # noqa: E402
from tessera.components.moe.experts import row_multiple  # noqa: E402
from tessera.components.precision.probe import matmul_flops  # noqa: E402


def hf_config(args: argparse.Namespace):
    """A transformers DeepseekV3 config with the dimensions of our `debug` preset (or `--dim` etc.)."""
    import transformers

    return transformers.DeepseekV3Config(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=3 * args.dim,
        moe_intermediate_size=3 * args.dim // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        n_shared_experts=1, n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=args.groups,
        topk_group=args.topk_groups,
        routed_scaling_factor=1.0, norm_topk_prob=True, q_lora_rank=args.dim // 2, kv_lora_rank=args.dim // 4,
        qk_nope_head_dim=args.dim // args.heads, qk_rope_head_dim=args.dim // args.heads // 2,
        v_head_dim=args.dim // args.heads, first_k_dense_replace=1, max_position_embeddings=max(args.seq, 128),
        rope_interleave=True, num_nextn_predict_layers=0)


GEMM_KERNELS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
                "aten::_scaled_dot_product_flash_attention_for_cpu",
                "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def gemm_seconds(step) -> float:
    """Seconds one call of `step` spends inside GEMM kernels (self time, from the profiler;
    grouped expert GEMMs run as one `aten::mm` per expert, so they are included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_KERNELS) / 1e6


def parse_args(argv: list[str]) -> argparse.Namespace:
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
    parser.add_argument("--steps", type=int, default=8, help="interleaved timed steps per model")
    parser.add_argument("--rounds", type=int, default=5, help="MoE table: rounds of interleaved steps (median taken)")
    parser.add_argument("--no-compile", action="store_true",
                        help="MoE table: skip the compiled rows (torch.compile of each layer, ~20 s per precision)")
    return parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["dense"]:  # the dense model's table lives in its own file
        from benchmarks.llama_throughput import main as dense

        return dense(sys.argv[2:])
    if sys.argv[1:2] == ["moe"]:
        return moe_main()
    args = parse_args(sys.argv[1:])
    torch.set_num_threads(1)
    import transformers
    from rich.table import Table

    console, precisions = _console_and_precisions()
    config = hf_config(args)
    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        models = {"tessera": load_pretrained(tmp).train(), "tessera compile": load_pretrained(tmp).train(),
                  "transformers": theirs.train(), "transformers compile": copy.deepcopy(theirs).train()}
    for layer in models["tessera compile"].layers:  # what the trainer's compute.compile=True does
        layer.compile(dynamic=False)
    models["transformers compile"] = torch.compile(models["transformers compile"])
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    n_tokens = args.batch * args.seq
    flops_per_token = stats.training_flops_per_token(models["tessera"], args.seq)
    table = Table(title=f"training step, DeepSeek-V3-style dim {args.dim}, {args.layers} layers, "
                        f"{args.experts} experts "
                        f"top-{args.top_k} +1 shared, batch {args.batch} x {args.seq}, 1 thread, CPU; medians of "
                        f"{args.steps} interleaved steps")
    for col in ("precision", "model", "ms/step", "tokens/s", "x transformers compile", "MFU", "matmul peak GFLOP/s"):
        table.add_column(col, justify="right")
    floors = []
    for name, dtype in precisions:
        peak = matmul_flops(dtype or torch.float32, budget_s=1.0)
        steps = {label: training_step(model, tessera_loss if label.startswith("tessera") else hf_causal_lm_loss,
                                      tokens, dtype) for label, model in models.items()}
        seconds = interleaved_medians(steps, repeats=args.steps)
        for label, t in seconds.items():
            table.add_row(name, label, f"{t * 1e3:.0f}", f"{n_tokens / t:,.0f}",
                          f"{seconds['transformers compile'] / t:.2f}", f"{flops_per_token * n_tokens / t / peak:.1%}",
                          f"{peak / 1e9:,.1f}")
        floors.append((name, gemm_seconds(steps["tessera compile"]), seconds["transformers compile"] / 1.2,
                       flops_per_token * n_tokens / peak))
    console.print(table)
    floor_table = Table(title="how far the step can shrink: time in GEMM kernels (matmuls and fused attention) of one "
                              "profiled tessera compile step, against 1/1.2 of transformers compile's step")
    for col in ("precision", "GEMM kernels ms", "model FLOPs at matmul peak ms", "1.2x transformers compile ms"):
        floor_table.add_column(col, justify="right")
    for name, gemm, target, at_peak in floors:
        floor_table.add_row(name, f"{gemm * 1e3:.0f}", f"{at_peak * 1e3:.0f}", f"{target * 1e3:.0f}")
    console.print(floor_table)

    moe_table(models["tessera"].layers[1].feed_forward, args, precisions, console)


def swiglu_gemms(groups: list[tuple[int, int]], dim: int, dtype: torch.dtype):
    """A closure running the nine GEMMs of a SwiGLU's forward and backward (as autograd lays
    them out for nn.Linear) for each (rows, hidden) group, on random operands: the GEMM floor
    of a dense layer (one group) or of routed experts (one group per expert, plus the shared)."""
    def operands(m: int, h: int) -> list[torch.Tensor]:
        return [torch.randn(*shape, dtype=dtype) for shape in
                ((m, dim), (h, dim), (h, dim), (dim, h), (m, h), (m, dim), (m, h), (m, h))]

    groups_ops = [operands(m, h) for m, h in groups if m]

    def run() -> None:
        for x, wg, wu, wd, a, grad_y, grad_g, grad_u in groups_ops:
            x @ wg.t(), x @ wu.t(), a @ wd.t()  # forward
            grad_y @ wd, grad_y.t() @ a  # down projection: input and weight gradients
            grad_g @ wg, grad_g.t() @ x, grad_u @ wu, grad_u.t() @ x  # gate and up projections
    return run


def batched_swiglu_gemms(n_experts: int, capacity: int, hidden: int, dim: int, dtype: torch.dtype):
    """The same nine GEMMs as `swiglu_gemms` for `n_experts` experts of `capacity` rows each,
    one `bmm` per product (what the MoE runs on CPU in bf16 when its experts are near balance)."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(n_experts, *shape, dtype=dtype)

    x, wg, wu, wd = rand(capacity, dim), rand(hidden, dim), rand(hidden, dim), rand(dim, hidden)
    a, grad_y = rand(capacity, hidden), rand(capacity, dim)
    grad_g, grad_u = rand(capacity, hidden), rand(capacity, hidden)

    def run() -> None:
        torch.bmm(x, wg.mT), torch.bmm(x, wu.mT), torch.bmm(a, wd.mT)
        torch.bmm(grad_y, wd), torch.bmm(grad_y.mT, a)
        torch.bmm(grad_g, wg), torch.bmm(grad_g.mT, x), torch.bmm(grad_u, wu), torch.bmm(grad_u.mT, x)
    return run


def moe_table(moe, args: argparse.Namespace, precisions, console) -> None:
    """One MoE layer (forward+backward) against a dense SwiGLU with the same activated FLOPs,
    eager and each layer under torch.compile (what a run with `compute.compile=True` gets),
    and the same comparison for their bare GEMMs: the routed experts' rows per expert as the
    grouped layout pads them (one GEMM per expert), and as the uniform layout does (every
    expert at the busiest one's rows, one bmm per product), each plus the shared expert's.
    Each number is a median over `args.rounds` rounds of interleaved medians."""
    from rich.table import Table

    width = (moe.router.top_k + 1) * moe.experts.hidden_dim
    dense = SwiGLU(dim=args.dim, hidden_dim=width)
    layers = {"eager": (moe, dense)}
    if not args.no_compile:  # compiled wrappers around the same modules: one set of weights
        layers["compiled"] = (torch.compile(moe, dynamic=False), torch.compile(dense, dynamic=False))
    x = torch.randn(args.batch, args.seq, args.dim)
    with torch.no_grad():
        counts = torch.bincount(moe.router(x.view(-1, args.dim)).indices.flatten(), minlength=moe.n_experts)
    n_tokens, hidden = args.batch * args.seq, moe.experts.hidden_dim
    layer_table = Table(title=f"MoE layer vs dense SwiGLU of equal activated FLOPs (dim {args.dim}, {moe.n_experts} "
                              f"experts top-{moe.top_k} + 1 shared of width {hidden}; forward+backward, 1 thread, "
                              f"thread-time medians of {args.steps} interleaved steps, median of {args.rounds} rounds)")
    for col in ("precision", "layers", "MoE ms", "dense ms", "MoE / dense", "GEMMs alone: MoE / dense",
                "as bmm: MoE / dense"):
        layer_table.add_column(col, justify="right")
    for name, dtype in precisions:
        ctx = (lambda dtype=dtype: torch.autocast("cpu", dtype=dtype)) if dtype else nullcontext

        def layer_step(module, ctx=ctx):
            def step() -> None:
                with ctx():
                    out = module(x.clone().requires_grad_())
                out.float().square().mean().backward()
            return step

        gemm_dtype = dtype or torch.float32
        multiple = row_multiple("cpu", gemm_dtype)  # as the layer pads each expert's rows
        padded = ((counts + multiple - 1) // multiple * multiple).tolist()
        steps = {f"{kind} {which}": layer_step(module) for kind, pair in layers.items()
                 for which, module in zip(("moe", "dense"), pair)}
        steps |= {"moe gemms": swiglu_gemms([(m, hidden) for m in padded] + [(n_tokens, hidden)], args.dim,
                                            gemm_dtype),
                  "dense gemms": swiglu_gemms([(n_tokens, width)], args.dim, gemm_dtype),
                  "moe bmm": batched_swiglu_gemms(moe.n_experts, max(padded), hidden, args.dim, gemm_dtype),
                  "shared gemms": swiglu_gemms([(n_tokens, hidden)], args.dim, gemm_dtype)}
        rounds = [interleaved_medians(steps, repeats=args.steps, clock=time.thread_time) for _ in range(args.rounds)]
        floor = statistics.median(r["moe gemms"] / r["dense gemms"] for r in rounds)
        floor_bmm = statistics.median((r["moe bmm"] + r["shared gemms"]) / r["dense gemms"] for r in rounds)
        for kind in layers:
            ratio = statistics.median(r[f"{kind} moe"] / r[f"{kind} dense"] for r in rounds)
            moe_ms, dense_ms = (statistics.median(r[f"{kind} {key}"] for r in rounds) * 1e3 for key in ("moe", "dense"))
            layer_table.add_row(name, kind, f"{moe_ms:.1f}", f"{dense_ms:.1f}", f"{ratio:.2f}", f"{floor:.2f}",
                                f"{floor_bmm:.2f}")
    console.print(layer_table)


def _console_and_precisions():
    """A wide rich console, and the precisions this machine runs fast (the skipped ones said on
    it); sets the host allocator as a run does, before anything is timed (`allocate_as_a_run`)."""
    from rich.console import Console

    console = Console(width=160)
    console.print(allocate_as_a_run(), highlight=False)
    precisions, skipped = fast_precisions()
    for reason in skipped:
        console.print(reason, highlight=False)
    return console, precisions


def moe_main() -> None:
    """`train_throughput.py moe [flags]`: the MoE layer table alone, on the same model's layer 1."""
    args = parse_args(sys.argv[2:])
    torch.set_num_threads(1)
    import transformers

    console, precisions = _console_and_precisions()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.DeepseekV3ForCausalLM(hf_config(args)).save_pretrained(tmp)
        model = load_pretrained(tmp).train()
    moe_table(model.layers[1].feed_forward, args, precisions, console)


if __name__ == "__main__":
    main()
