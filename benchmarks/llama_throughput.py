"""Dense-model training throughput and MFU against transformers' LlamaForCausalLM, side by side.

    python benchmarks/llama_throughput.py [--dim 512] [--layers 8] [--batch 8] [--seq 512] [--steps 3]

Same architecture (RMSNorm, RoPE, GQA, SwiGLU), same weights (copied across), same batch and
precision, one thread, full training steps (forward, backward, AdamW). Our model runs eager,
with per-block torch.compile, with activation checkpointing, and (bf16) with bf16 weights
and fp32 master copies (the `bf16_params` policy); MFU is against this
machine's matmul peak measured in the same run for the step's compute dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fiddle as fdl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import hf_causal_lm_loss, tessera_loss, training_step_seconds  # noqa: E402
from components.model import families  # noqa: E402
from components.model.hf_llama import llama_parameter_names  # noqa: E402
from components.model.stats import training_flops_per_token  # noqa: E402
from components.precision.policies import BF16Params  # noqa: E402
from components.train.metrics import measure_matmul_peak  # noqa: E402


def copy_llama_weights(ours, theirs, n_layers: int) -> None:
    hf, names = dict(theirs.named_parameters()), llama_parameter_names(n_layers)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(hf[names[name]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (saves minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers
    from rich.console import Console
    from rich.table import Table

    hidden = 4 * args.dim * 2 // 3 // 64 * 64
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).train()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    n_tokens = args.batch * args.seq

    def ours_model(**block_options):
        model = fdl.build(families.llama(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                         n_heads=args.heads, n_kv_heads=args.kv_heads, hidden_dim=hidden,
                                         rope_theta=10000.0, norm_eps=1e-5))
        copy_llama_weights(model, theirs, args.layers)
        for layer in model.layers:
            for key, value in block_options.items():
                if key == "compile":
                    layer.compile()
                else:
                    setattr(layer, key, value)
        return model.train()

    variants = [("tessera eager", {}), ("tessera + activation checkpointing", {"checkpoint_activations": True})]
    if not args.no_compile:
        variants.append(("tessera + compile", {"compile": True}))
    flops = training_flops_per_token(ours_model(), args.seq)
    table = Table(title=f"dense Llama-style d={args.dim}, {args.layers} layers, GQA {args.heads}/{args.kv_heads}, "
                        f"batch {args.batch} x {args.seq}, 1 thread, CPU")
    for col in ("precision", "model", "s/step", "tokens/s", "x transformers", "MFU", "peak GFLOP/s"):
        table.add_column(col, justify="right")
    for label, dtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        peak = measure_matmul_peak(dtype or torch.float32)
        t_hf = training_step_seconds(theirs, hf_causal_lm_loss, tokens, dtype, args.steps, warmup=2)
        rows = [("transformers", t_hf)]
        for name, options in variants:
            rows.append((name, training_step_seconds(ours_model(**options), tessera_loss, tokens, dtype, args.steps,
                                                     warmup=2)))  # compilation happens in the warm-up
        if dtype is torch.bfloat16:  # bf16 weights and gradients, fp32 masters and AdamW state
            policy = BF16Params()
            rows.append(("tessera bf16_params", training_step_seconds(
                policy.prepare(ours_model()), tessera_loss, tokens, dtype, args.steps, warmup=2,
                wrap_optimizer=policy.wrap_optimizer)))
        for name, seconds in rows:
            table.add_row(label, name, f"{seconds:.3f}", f"{n_tokens / seconds:,.0f}", f"{t_hf / seconds:.2f}",
                          f"{flops * n_tokens / seconds / peak:.1%}", f"{peak / 1e9:,.0f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
