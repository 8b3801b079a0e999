"""Reuse tessera blocks in your own PyTorch model: no registry, no fiddle.

    python examples/reuse_block.py
"""

import torch
from torch import nn

from components.attention.gqa import GroupedQueryAttention
from components.mlp.gated import SwiGLU
from components.model.block import TransformerBlock
from components.norm.rmsnorm import RMSNorm
from components.position.rope import RoPE


class TinyClassifier(nn.Module):
    """A sequence classifier of your own that borrows two tessera transformer blocks."""

    def __init__(self, vocab: int = 1000, dim: int = 64, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                attention=GroupedQueryAttention(dim=dim, n_heads=4, n_kv_heads=2, position=RoPE()),
                feed_forward=SwiGLU(dim=dim, hidden_dim=4 * dim),
                attention_norm=RMSNorm(dim=dim),
                ffn_norm=RMSNorm(dim=dim),
            )
            for _ in range(2)
        )
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(x[:, -1])


if __name__ == "__main__":
    logits = TinyClassifier()(torch.randint(0, 1000, (2, 16)))
    print("logits", tuple(logits.shape))
