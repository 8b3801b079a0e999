"""Dense decoder pretraining: Llama-style (RMSNorm, RoPE, grouped-query attention, SwiGLU),
DeepSeek LLM 7B/67B, GPT-2, and a hybrid linear/softmax attention stack.

Run `python recipes/llama_pretrain.py --help` for presets, overrides and swappable components.
The published-model presets reproduce the papers' parameter counts under `--dry-run`.
"""

from __future__ import annotations

import fiddle as fdl

from components.data.defaults import stdlib_corpus
from components.families.gpt2.builder import gpt2
from components.families.llama.builder import llama
from components.train.outputs import run_outputs
from components.train.trainer import train
from registry import ATTENTION, OPTIMIZER, PARALLEL_PLAN, PRECISION, SCHEDULER, Recipe

DEBUG_VOCAB = 2048  # a small BPE trained on the default corpus: cheap softmax on 2 cores

recipe = Recipe(name="llama_pretrain", doc=__doc__)


@recipe.preset(default=True)
def debug() -> fdl.Partial:
    """6-layer Llama-style model on stdlib source, precision `auto`: about a minute on 2 CPU cores."""
    steps = 350
    return fdl.Partial(
        train,
        model=llama(vocab_size=DEBUG_VOCAB, dim=192, n_layers=6, n_heads=6, n_kv_heads=2,
                             hidden_dim=512),
        data=stdlib_corpus(vocab_size=DEBUG_VOCAB),
        optimizer=OPTIMIZER.partial("adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
        scheduler=SCHEDULER.config("warmup_cosine", warmup_steps=30, total_steps=steps, min_ratio=0.1),
        parallel=PARALLEL_PLAN.config("single"),
        steps=steps,
        batch_size=16,
        seq_len=128,
        grad_clip=1.0,
        precision=PRECISION.config("auto"),  # bf16 where this machine runs it faster than fp32, else fp32
        seed=0,
        **run_outputs("runs/llama_pretrain/debug", every=100),
    )


@recipe.preset
def hybrid_debug() -> fdl.Partial:
    """The debug run with linear attention in layers 0, 1, 3, 4 and softmax attention in 2 and 5."""
    config = debug()
    for key, value in run_outputs("runs/llama_pretrain/hybrid_debug", every=100).items():
        setattr(config, key, value)
    for i, layer in enumerate(config.model.layers):
        if i % 3 != 2:
            layer.attention = ATTENTION.config("linear", dim=layer.attention.dim, n_heads=layer.attention.n_heads,
                                               chunk_size=64)
    return config


def _published(name: str, model: fdl.Config, *, seq_len: int, batch_size: int, lr: float, steps: int,
               warmup_steps: int, betas: tuple[float, float] = (0.9, 0.95)) -> fdl.Partial:
    """A full-size run: the published architecture and optimiser settings (for --dry-run and clusters)."""
    config = debug()
    for key, value in run_outputs(f"runs/llama_pretrain/{name}", every=1000).items():
        setattr(config, key, value)
    config.model = model
    config.optimizer = OPTIMIZER.partial("adamw", lr=lr, betas=betas, weight_decay=0.1)
    config.scheduler = SCHEDULER.config("warmup_cosine", warmup_steps=warmup_steps, total_steps=steps, min_ratio=0.1)
    config.steps, config.batch_size, config.seq_len = steps, batch_size, seq_len
    config.precision = PRECISION.config("bf16")  # the published runs' precision, whatever machine inspects them
    return config


@recipe.preset
def llama3_8b() -> fdl.Partial:
    """Llama 3 8B: 32 layers, dim 4096, GQA 32/8, SwiGLU 14336, RoPE theta 500000, vocab 128256."""
    model = llama(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                           rope_theta=500000.0, norm_eps=1e-5)
    return _published("llama3_8b", model, seq_len=8192, batch_size=512, lr=3e-4, steps=1_200_000, warmup_steps=8000)


@recipe.preset
def deepseek_llm_7b() -> fdl.Partial:
    """DeepSeek LLM 7B (6.9B): 30 layers, dim 4096, MHA 32 heads, SwiGLU 11008, init std 0.006."""
    model = llama(vocab_size=102400, dim=4096, n_layers=30, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                           norm_eps=1e-6, init_std=0.006)
    # 2T tokens at 2304 x 4096 tokens per step; lr 4.2e-4 with 2000 warmup steps (paper Table 2).
    return _published("deepseek_llm_7b", model,
                      seq_len=4096, batch_size=2304, lr=4.2e-4, steps=211_926, warmup_steps=2000)


@recipe.preset
def deepseek_llm_67b() -> fdl.Partial:
    """DeepSeek LLM 67B: 95 layers, dim 8192, GQA 64/8, SwiGLU 22016, init std 0.006."""
    model = llama(vocab_size=102400, dim=8192, n_layers=95, n_heads=64, n_kv_heads=8, hidden_dim=22016,
                           norm_eps=1e-6, init_std=0.006)
    return _published("deepseek_llm_67b", model,
                      seq_len=4096, batch_size=4608, lr=3.2e-4, steps=105_963, warmup_steps=2000)


@recipe.preset
def gpt2_small() -> fdl.Partial:
    """GPT-2 small (124M): 12 layers, dim 768, 12 heads, learned positions, LayerNorm, GELU MLP, tied."""
    model = gpt2(vocab_size=50257, dim=768, n_layers=12, n_heads=12, max_len=1024)
    return _published("gpt2_small", model, seq_len=1024, batch_size=512, lr=6e-4, steps=600_000, warmup_steps=2000)


if __name__ == "__main__":
    recipe.main()
