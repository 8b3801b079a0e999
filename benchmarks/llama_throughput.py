"""Dense-model training throughput and MFU against transformers' LlamaForCausalLM, side by side.

    python benchmarks/llama_throughput.py [--dim 512] [--layers 8] [--batch 4] [--seq 256] [--steps 5]

Same architecture (RMSNorm, RoPE, GQA, SwiGLU), same weights (copied across), same batch and
precision, one thread, full training steps (forward, backward, fused AdamW), timed
interleaved and reported as medians. Theirs runs eager and under torch.compile; ours eager,
with per-block torch.compile, with activation checkpointing, and (bf16) with bf16 weights
and fp32 master copies (the `bf16_params` policy); MFU is against this machine's matmul
peak for the step's compute dtype. bf16 rows are skipped, with the reason printed, where the
CPU has no native bf16.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import fiddle as fdl
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
from tessera.components.families.llama.builder import llama  # noqa: E402
from tessera.components.families.llama.hf import llama_parameter_names  # noqa: E402
from tessera.components.model.stats import training_flops_per_token  # noqa: E402
from tessera.components.precision.policies import BF16Params  # noqa: E402
from tessera.components.precision.probe import matmul_flops  # noqa: E402


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
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="interleaved timed steps per model")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (saves minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    allocator = allocate_as_a_run()
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
        model = fdl.build(llama(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                         n_heads=args.heads, n_kv_heads=args.kv_heads, hidden_dim=hidden,
                                         rope_theta=10000.0, norm_eps=1e-5))
        copy_llama_weights(model, theirs, args.layers)
        for layer in model.layers:
            for key, value in block_options.items():
                if key == "compile":
                    layer.compile(dynamic=False)  # as the trainer does
                else:
                    setattr(layer, key, value)
        return model.train()

    variants = [("tessera", {}), ("tessera + activation checkpointing", {"checkpoint_activations": True})]
    if not args.no_compile:
        variants.append(("tessera compile", {"compile": True}))
    models = {"transformers": theirs}
    if not args.no_compile:
        models["transformers compile"] = torch.compile(copy.deepcopy(theirs))
    models.update({name: ours_model(**options) for name, options in variants})
    flops = training_flops_per_token(models["tessera"], args.seq)
    console = Console(width=150)
    console.print(allocator, highlight=False)
    precisions, skipped = fast_precisions()
    for reason in skipped:
        console.print(reason, highlight=False)
    table = Table(title=f"dense Llama-style d={args.dim}, {args.layers} layers, GQA {args.heads}/{args.kv_heads}, "
                        f"batch {args.batch} x {args.seq}, 1 thread, CPU; medians of {args.steps} interleaved steps")
    for col in ("precision", "model", "ms/step", "tokens/s", "x transformers", "MFU", "peak GFLOP/s"):
        table.add_column(col, justify="right")
    for label, dtype in precisions:
        peak = matmul_flops(dtype or torch.float32, budget_s=1.0)
        steps = {name: training_step(model, hf_causal_lm_loss if name.startswith("transformers") else tessera_loss,
                                     tokens, dtype) for name, model in models.items()}
        if dtype is torch.bfloat16:  # bf16 weights and gradients, fp32 masters and AdamW state
            policy = BF16Params()
            steps["tessera bf16_params"] = training_step(policy.prepare(ours_model()), tessera_loss, tokens, dtype,
                                                         wrap_optimizer=policy.wrap_optimizer)
        seconds = interleaved_medians(steps, repeats=args.steps)  # compilation happens in the warm-up
        for name, t in seconds.items():
            table.add_row(label, name, f"{t * 1e3:.0f}", f"{n_tokens / t:,.0f}", f"{seconds['transformers'] / t:.2f}",
                          f"{flops * n_tokens / t / peak:.1%}", f"{peak / 1e9:,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
