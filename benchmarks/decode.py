"""Decoding speed and cache memory: MHA, GQA and MLA (latent cache, with and without the absorbed
projections) at about equal size, and MTP speculative decoding against plain greedy.

    python benchmarks/decode.py [--prompt 128] [--new 64] [--repeats 5] [--out benchmarks/results/decode.md]

One thread, fp32, random weights (speed does not depend on them; speculation's does, so its
model is first trained briefly on a synthetic sequence it can learn). Decode tokens/s is
batch x (new - 1) / (time of `generate` for `new` tokens - time for 1 token), so the prefill is
left out. Contenders are timed round-robin (`benchmarks/timing.py`), each reporting its median.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import interleaved_medians  # noqa: E402
from tessera.components.attention.gqa import GroupedQueryAttention  # noqa: E402
from tessera.components.attention.mla import MultiHeadLatentAttention  # noqa: E402
from tessera.components.generate import generate, speculative_generate  # noqa: E402
from tessera.components.mlp.gated import SwiGLU  # noqa: E402
from tessera.components.model.block import TransformerBlock  # noqa: E402
from tessera.components.model.decoder import DecoderLM  # noqa: E402
from tessera.components.model.mtp import MultiTokenPrediction  # noqa: E402
from tessera.components.norm.rmsnorm import RMSNorm  # noqa: E402
from tessera.components.position.rope import RoPE  # noqa: E402

DIM, LAYERS, HEADS, HEAD_DIM, VOCAB, HIDDEN = 256, 4, 8, 32, 2048, 688
# GQA's 2 kv heads save 2 x 256 x 192 weights per layer; a wider FFN (+128) gives them back.
GQA_HIDDEN = HIDDEN + 128
# MLA at DeepSeek-V2's proportions for head width 32 (kv_lora_rank = 4 x head, rope = head / 2):
# its projections hold about as many weights as MHA's four.
MLA = dict(kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def attention(kind: str):
    if kind == "mha":
        return GroupedQueryAttention(dim=DIM, n_heads=HEADS, position=RoPE())
    if kind == "gqa":
        return GroupedQueryAttention(dim=DIM, n_heads=HEADS, n_kv_heads=2, position=RoPE())
    return MultiHeadLatentAttention(dim=DIM, n_heads=HEADS, position=RoPE(interleaved=True),
                                    kv_norm=RMSNorm(dim=MLA["kv_lora_rank"]), **MLA)


def block(kind: str) -> TransformerBlock:
    hidden = GQA_HIDDEN if kind == "gqa" else HIDDEN
    return TransformerBlock(attention=attention(kind), feed_forward=SwiGLU(dim=DIM, hidden_dim=hidden),
                            attention_norm=RMSNorm(dim=DIM), ffn_norm=RMSNorm(dim=DIM))


def model(kind: str, *, mtp: bool = False) -> DecoderLM:
    torch.manual_seed(0)
    modules = [MultiTokenPrediction(dim=DIM, block=block(kind), embed_norm=RMSNorm(dim=DIM),
                                    hidden_norm=RMSNorm(dim=DIM), head_norm=RMSNorm(dim=DIM))] if mtp else None
    built = DecoderLM(vocab_size=VOCAB, dim=DIM, layers=[block(kind) for _ in range(LAYERS)], norm=RMSNorm(dim=DIM),
                      mtp=modules)
    built.init_weights()
    return built.eval()


def set_absorbed(decoder: DecoderLM, absorb: bool) -> None:
    for layer in [*decoder.layers, *(m.block for m in decoder.mtp)]:
        if isinstance(layer.attention, MultiHeadLatentAttention):
            layer.attention.decode_absorbed = absorb


def cache_bytes_per_token(decoder: DecoderLM, max_len: int = 256) -> int:
    caches = decoder.new_caches(batch=1, max_len=max_len, device="cpu", dtype=torch.float32)
    return sum(c.nbytes() for c in caches) // max_len


def prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, VOCAB, (batch, length), generator=g).tolist()


def decode_rows(args) -> list[list[str]]:
    """One row per attention: weights, cache per token, decode tokens/s at batch 1 and 8."""
    contenders = {"MHA (8 kv heads)": ("mha", None), "GQA (2 kv heads)": ("gqa", None),
                  "MLA, absorbed": ("mla", True), "MLA, decompressed": ("mla", False)}
    models = {kind: model(kind) for kind in ("mha", "gqa", "mla")}
    steps = {}
    for label, (kind, absorb) in contenders.items():
        for batch in (1, 8):
            for new in (1, args.new):
                def run(kind=kind, absorb=absorb, batch=batch, new=new) -> None:
                    set_absorbed(models[kind], bool(absorb))
                    generate(models[kind], prompts(batch, args.prompt), max_new_tokens=new)
                steps[(label, batch, new)] = run
    medians = interleaved_medians(steps, repeats=args.repeats, warmup=1)
    rows, base = [], {}
    for label, (kind, _) in contenders.items():
        decoder = models[kind]
        rate = {b: b * (args.new - 1) / (medians[(label, b, args.new)] - medians[(label, b, 1)]) for b in (1, 8)}
        base = base or rate
        attn = decoder.layers[0].attention
        rows.append([label, f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}",
                     str(attn.kv_cache_elements_per_token()), f"{cache_bytes_per_token(decoder):,}",
                     f"{rate[1]:.0f} ({rate[1] / base[1]:.2f}x)", f"{rate[8]:.0f} ({rate[8] / base[8]:.2f}x)"])
    return rows


def trained_mtp_model(steps: int) -> DecoderLM:
    """MLA + MTP trained on walks of a fixed random permutation of the first 256 tokens (learnable
    by both the model and its MTP module, so drafts are mostly right)."""
    decoder = model("mla", mtp=True).train()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(decoder.parameters(), lr=2e-3)
    for _ in range(steps):
        seq = [torch.randint(0, 256, (16,), generator=g)]
        for _ in range(64):
            seq.append(perm[seq[-1]])
        tokens = torch.stack(seq, 1)
        loss = sum(decoder.losses(tokens[:, :-1], tokens[:, 1:]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoder.perm = perm
    return decoder.eval()


def speculative_rows(args) -> list[list[str]]:
    """Plain greedy against MTP speculation at batch 1, on a trained and on a random model."""
    rows = []
    for label, decoder in (("MLA + MTP, trained", trained_mtp_model(args.train_steps)),
                           ("MLA + MTP, random weights", model("mla", mtp=True))):
        start = [int(t) for t in torch.randint(0, 256, (1,), generator=torch.Generator().manual_seed(2))]
        prompt = start
        perm = getattr(decoder, "perm", None)
        while len(prompt) < 32:
            prompt = prompt + [int(perm[prompt[-1]]) if perm is not None else (prompt[-1] * 7 + 3) % VOCAB]
        plain = generate(decoder, [prompt], max_new_tokens=args.new)
        spec, stats = speculative_generate(decoder, [prompt], max_new_tokens=args.new)
        assert spec == plain, "speculative decoding must equal greedy"
        medians = interleaved_medians({
            "greedy": lambda d=decoder, p=prompt: generate(d, [p], max_new_tokens=args.new),
            "speculative": lambda d=decoder, p=prompt: speculative_generate(d, [p], max_new_tokens=args.new)},
            repeats=args.repeats, warmup=1)
        rows.append([label, f"{stats.acceptance_rate:.2f}", f"{stats.tokens_per_forward:.2f}",
                     f"{args.new / medians['greedy']:.0f}", f"{args.new / medians['speculative']:.0f}",
                     f"{medians['greedy'] / medians['speculative']:.2f}x"])
    return rows


def machine() -> str:
    """CPU model and the vector extensions that matter to matmul speed, cores, torch, Python."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    flags_line = re.search(r"^Flags:\s*(.+)$", lscpu, re.MULTILINE)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags] or ["none of avx2/avx512"]
    return (f"{name.group(1).strip() if name else platform.processor()}, {os.cpu_count()} cores, "
            f"flags: {' '.join(vector)}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{torch.get_num_threads()} thread")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=60, help="training steps of the speculation model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/decode.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began, load_before = time.time(), os.getloadavg()[0]
    decode = decode_rows(args)
    speculative = speculative_rows(args)
    load = (f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"(other work shares this machine)")
    lines = ["# Decoding: caches and speculative decoding", "", machine() + "; " + load + ".", "",
             f"`python benchmarks/decode.py --prompt {args.prompt} --new {args.new} --repeats {args.repeats} "
             f"--train-steps {args.train_steps}` ({time.time() - began:.0f} s)", "",
             f"Models: {LAYERS} layers of width {DIM}, {HEADS} heads, SwiGLU, vocabulary {VOCAB}, fp32. Decode "
             f"tokens/s counts the {args.new - 1} tokens after the first (prefill of {args.prompt} prompt tokens "
             f"excluded), medians of {args.repeats} interleaved repeats; ratios against MHA. Cache bytes per token: "
             f"all layers, fp32.", "",
             *table(["attention", "params (M)", "cache elements / token / layer", "cache bytes / token",
                     "decode tok/s, batch 1", "decode tok/s, batch 8"], decode), "",
             f"Speculative decoding with the MTP module as drafter (DeepSeek-V3 §5.4.3), batch 1, "
             f"{args.new} new tokens after a 32-token prompt, greedy; its output equals plain greedy (checked). "
             f"Tokens/s include the prefill. The trained model saw {args.train_steps} AdamW steps of walks "
             f"along a fixed permutation, which its MTP module learns too.", "",
             *table(["model", "acceptance", "tokens / forward", "greedy tok/s", "speculative tok/s", "speed-up"],
                    speculative), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
