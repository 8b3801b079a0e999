"""Reuse tessera's blocks in a model of your own: no tessera base class, no fiddle, no registry.

A nanoGPT-style byte-level language model (embedding, blocks, final norm, head) whose blocks use
tessera's multi-head latent attention (MLA, DeepSeek-V2, arXiv:2405.04434 section 2.1) and
DeepSeekMoE feed-forward (arXiv:2401.06066: shared experts plus fine-grained routed ones), built
by calling their constructors. It trains on bytes of the Python standard library's source.

The MoE's two load-balancing mechanisms are wired in by hand, which is all a third party has
to add to an ordinary training loop:

1. the sequence-wise balance loss: after each forward, `moe.auxiliary_loss()` returns that
   MoE's weighted balance term (DeepSeek-V3, arXiv:2412.19437 section 2.1.2, eq. 17-20); add it
   to the language-model loss;
2. the auxiliary-loss-free bias update (same section): after each `optimizer.step()`, call
   `router.after_optimizer_step()` on every router; it moves each expert's selection bias by
   gamma * sign(mean load - load) using the tokens it routed since the last call.

    python examples/third_party_model.py          # about 10 s on 2 CPU cores
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.attention.mla import MultiHeadLatentAttention
from tessera.components.mlp.gated import SwiGLU
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE
from tessera.components.moe.router import Router
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.rope import RoPE

DIM, N_LAYERS, N_HEADS = 64, 2, 4
N_EXPERTS, TOP_K, EXPERT_HIDDEN = 8, 2, 64
SEQ, BATCH, STEPS, LR = 64, 16, 60, 3e-3
BIAS_UPDATE_SPEED = 1e-2  # gamma; DeepSeek-V3 used 0.001 over trillions of tokens, a 60-step demo needs more
BALANCE_ALPHA = 1e-4      # DeepSeek-V3's alpha for the sequence-wise balance loss


class Block(nn.Module):
    """A pre-norm residual block with torch's own norms around tessera's MLA and DeepSeekMoE."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(DIM)
        self.attn = MultiHeadLatentAttention(
            dim=DIM, n_heads=N_HEADS, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, position=RoPE(interleaved=True), q_norm=RMSNorm(dim=32), kv_norm=RMSNorm(dim=32))
        self.ln_2 = nn.RMSNorm(DIM)
        self.mlp = MoE(
            dim=DIM,
            router=Router(dim=DIM, n_experts=N_EXPERTS, top_k=TOP_K, score_func="sigmoid", normalize_weights=True,
                          expert_bias=True, bias_update_speed=BIAS_UPDATE_SPEED),
            experts=GroupedExperts(n_experts=N_EXPERTS, dim=DIM, hidden_dim=EXPERT_HIDDEN),
            shared_experts=SwiGLU(dim=DIM, hidden_dim=EXPERT_HIDDEN),
            balance_alpha=BALANCE_ALPHA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """tokens [B, T] -> logits [B, T, 256]."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(256, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.ln_f = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, 256, bias=False)
        # tessera blocks come initialised (std 1/sqrt(fan_in)); here we re-draw them GPT-2 style,
        # as a model's own init pass may: 0.02, residual-stream outputs scaled by depth.
        out_std = 0.02 / math.sqrt(2 * N_LAYERS)
        for block in self.blocks:
            block.attn.reset_parameters(init_std=0.02, out_std=out_std)
            block.mlp.reset_parameters(init_std=0.02, out_std=out_std)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def stdlib_bytes(max_bytes: int = 400_000) -> torch.Tensor:
    """uint8 bytes of the standard library's .py files, sorted by path (the same on every
    machine with this Python version)."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batch(data: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=generator)
    window = torch.stack([data[s: s + SEQ + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def main() -> None:
    torch.manual_seed(0)
    data = stdlib_bytes()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    model = TinyGPT()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    routers = [moe.router for moe in moes]
    print(f"model: {N_LAYERS} blocks of tessera MLA + DeepSeekMoE ({N_EXPERTS} routed experts, top-{TOP_K}, "
          f"1 shared) in a plain nn.Module, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"data: {len(data):,} bytes of standard-library source ({len(train_data):,} train, {len(val_data):,} val)")
    print(f"balancing: sequence-wise balance loss with alpha {BALANCE_ALPHA:g}; aux-free expert bias with "
          f"gamma {BIAS_UPDATE_SPEED:g}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    val_batches = [batch(val_data, torch.Generator().manual_seed(100 + i)) for i in range(4)]

    def val_loss() -> float:
        model.eval()  # in eval the MoE computes no balance loss and the router counts no load
        with torch.no_grad():
            losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val_batches]
        model.train()
        return sum(losses) / len(losses)

    val_start, start = val_loss(), time.perf_counter()
    first_loss = last_loss = float("nan")
    for step in range(STEPS):
        tokens, targets = batch(train_data, generator)
        lm_loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        # (1) each MoE's balance term from this forward, already multiplied by its alpha.
        balance = torch.stack([moe.auxiliary_loss() for moe in moes]).sum()
        (lm_loss + balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # (2) the aux-free bias update from the load this step routed (no gradient involved).
        for router in routers:
            router.after_optimizer_step()
        first_loss = lm_loss.item() if step == 0 else first_loss
        last_loss = lm_loss.item()
        if step % 10 == 0 or step == STEPS - 1:
            load = routers[-1].last_load
            bias = max(r.expert_bias.abs().max().item() for r in routers)
            print(f"step {step:3d}  lm loss {last_loss:.3f}  balance loss {balance.item():.2e}  "
                  f"bias update: max |expert bias| {bias:.3f}  last block's expert load min/max "
                  f"{load.min():.0f}/{load.max():.0f} (mean {load.mean():.0f})")
    print(f"train: lm loss {first_loss:.3f} -> {last_loss:.3f} in {STEPS} steps, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"val: lm loss {val_start:.3f} -> {val_loss():.3f}")
    for i, router in enumerate(routers):
        print(f"expert bias, block {i}: " + " ".join(f"{b:+.3f}" for b in router.expert_bias.tolist()))


if __name__ == "__main__":
    main()
