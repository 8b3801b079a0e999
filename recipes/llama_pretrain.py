"""Dense decoder pretraining: Llama-style (RMSNorm, RoPE, grouped-query attention, SwiGLU),
DeepSeek LLM 7B/67B, GPT-2, and a hybrid linear/softmax attention stack.

Run `python recipes/llama_pretrain.py --help` for presets, overrides and swappable components.
The published-model presets reproduce the papers' parameter counts under `--dry-run`: Llama 3
(arXiv:2407.21783), DeepSeek LLM (arXiv:2401.02954), GPT-2 (Radford et al. 2019, "Language
Models are Unsupervised Multitask Learners") with GPT-3's small-model optimisation
(arXiv:2005.14165); each preset's comments give the section.
"""

from __future__ import annotations

import fiddle as fdl

from tessera.cli import Recipe
from tessera.components.data.defaults import stdlib_corpus
from tessera.components.families.gpt2.builder import gpt2
from tessera.components.families.llama.builder import llama
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.outputs import run_outputs
from tessera.components.train.step_options import StepOptions
from tessera.components.train.trainer import train
from tessera.registry import ATTENTION, OPTIMIZER, PARALLEL_PLAN, PRECISION, SCHEDULER, model_width

# Chosen for the debug run: a BPE this small keeps the softmax cheap on 2 CPU cores while still
# merging the corpus's common words.
DEBUG_VOCAB = 2048

recipe = Recipe(name="llama_pretrain", doc=__doc__)


def stability_guard() -> fdl.Config[StabilityGuard]:
    """Every preset's guard: skip non-finite or spiking steps, roll back to the last checkpoint
    after 3 in a row (at most 3 times), then stop the run with what went wrong and what to try."""
    return fdl.Config(StabilityGuard)


@recipe.preset(default=True)
def debug() -> fdl.Partial:
    """6-layer Llama-style model on stdlib source, precision `auto`: about a minute on 2 CPU cores.

    A Llama-layout decoder (RMSNorm, half-split RoPE, GQA 6/2, SwiGLU) of width 192 with a
    2048-token BPE, trained for 350 steps on the default offline corpus (Python standard
    library code, docstrings and pydoc topics). Every size and setting is chosen for the debug
    run, not taken from a paper. Precision `auto` computes in bf16 where this machine runs it
    faster than fp32, else in fp32."""
    steps = 350  # chosen: enough for the loss to fall well below the unigram entropy in about a minute
    return fdl.Partial(
        train,
        # chosen: the smallest stack where GQA (3 query heads per key/value head) and depth matter
        model=llama(vocab_size=DEBUG_VOCAB, dim=192, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=512),
        data=stdlib_corpus(vocab_size=DEBUG_VOCAB),
        # chosen: AdamW with the usual LLM betas and decay; lr 3e-3 suits a model of 3M parameters
        optimizer=OPTIMIZER.partial("adamw", lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
        # chosen: about 10% warmup, cosine to 10% of the peak
        scheduler=SCHEDULER.config("warmup_cosine", warmup_steps=30, total_steps=steps, min_ratio=0.1),
        parallel=PARALLEL_PLAN.config("single"),
        steps=steps,
        batch_size=16,  # chosen: 16 x 128 = 2048 tokens a step keeps a step well under a second
        seq_len=128,
        step=fdl.Config(StepOptions, grad_clip=1.0),  # chosen: the common LLM clipping (Llama 3 and DeepSeek use 1.0)
        precision=PRECISION.config("auto"),  # bf16 where this machine runs it faster than fp32, else fp32
        guard=stability_guard(),
        seed=0,
        **run_outputs("runs/llama_pretrain/debug", every=100),
    )


@recipe.preset
def hybrid_debug() -> fdl.Partial:
    """The debug run with linear attention in layers 0, 1, 3, 4 and softmax attention in 2 and 5.

    Chosen for the debug run: every third layer keeps softmax attention, so the stack can still
    recall exact tokens; chunks of 64 tokens divide the 128-token sequences."""
    config = debug()
    for key, value in run_outputs("runs/llama_pretrain/hybrid_debug", every=100).items():
        setattr(config, key, value)
    for i, layer in enumerate(config.model.layers):
        if i % 3 != 2:
            layer.attention = model_width(ATTENTION.config("linear", dim=layer.attention.dim,
                                                           n_heads=layer.attention.n_heads, chunk_size=64))
    return config


@recipe.preset(needs_from_hf=True)
def continue_hf() -> fdl.Partial:
    """Continued pretraining of a transformers checkpoint: run with --from-hf CHECKPOINT.

    `--from-hf` replaces the model by the checkpoint's (config.json), its initialisation by the
    checkpoint's weights and the data's tokenizer by its tokenizer.json; this preset gives the
    rest: the learning rate re-warmed from 0 to a new peak over the first 10% of the run, then
    cosine to 10% of it (Ibrahim et al. 2024, arXiv:2403.08763 §5: re-warm and re-decay), on
    the debug run's corpus and batch (point data.path at the new corpus). Without --from-hf the
    command line refuses it."""
    steps = 200  # chosen: a short adaptation run on the debug corpus
    config = debug()
    for key, value in run_outputs("runs/llama_pretrain/continue_hf", every=100).items():
        setattr(config, key, value)
    config.steps = steps
    # chosen: a peak well below the debug run's 3e-3, as a trained model's loss surface is sharper
    # (Ibrahim et al. §5 re-warm to the original peak for large shifts; lower it for small ones)
    config.optimizer = OPTIMIZER.partial("adamw", lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    config.scheduler = SCHEDULER.config("rewarm", warmup_steps=steps // 10, total_steps=steps, min_ratio=0.1)
    config.precision = PRECISION.config("fp32")  # chosen: exact continuation of fp32 weights on any machine
    return config


def _published(name: str, model: fdl.Config, *, seq_len: int, batch_size: int, lr: float, steps: int,
               warmup_steps: int, min_ratio: float = 0.1, schedule: fdl.Config | None = None) -> fdl.Partial:
    """A full-size run: the published architecture and optimiser settings (for --dry-run and
    clusters), everything stated here and nothing inherited from `debug`. AdamW betas
    (0.9, 0.95), weight decay 0.1 and clipping at 1.0 are common to every paper cited here
    (Llama 2, arXiv:2307.09288 §2.2, which Llama 3 follows; DeepSeek LLM §2.3; GPT-3 App. B).
    `schedule` replaces the default warmup + cosine to `min_ratio`."""
    return fdl.Partial(
        train, model=model,
        # The published corpora are not public: the default offline corpus stands in, so the
        # preset runs as given; point `data` at a real corpus for a real run.
        data=stdlib_corpus(vocab_size=DEBUG_VOCAB),
        optimizer=OPTIMIZER.partial("adamw", lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
        scheduler=schedule or SCHEDULER.config("warmup_cosine", warmup_steps=warmup_steps, total_steps=steps,
                                               min_ratio=min_ratio),
        parallel=PARALLEL_PLAN.config("fsdp"),  # none of these trains in reasonable time on one device
        steps=steps, batch_size=batch_size, seq_len=seq_len,
        step=fdl.Config(StepOptions, grad_clip=1.0,
                        micro_batch_size=1),  # chosen: one sequence per forward bounds activation memory
        precision=PRECISION.config("bf16"),  # the published runs' precision, whatever machine inspects them
        guard=stability_guard(), seed=0,
        **run_outputs(f"runs/llama_pretrain/{name}", every=1000))


@recipe.preset
def llama3_8b() -> fdl.Partial:
    """Llama 3 8B: 32 layers, dim 4096, GQA 32/8, SwiGLU 14336, RoPE theta 500000, vocab 128256."""
    # Architecture and peak lr 3e-4: Llama 3 (arXiv:2407.21783) Table 3.
    model = llama(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                  rope_theta=500000.0, norm_eps=1e-5)
    # §3.4.1 (the 405B recipe, the only one stated): 8000 warmup steps, cosine over 1.2M steps
    # to 1% of the peak, an initial batch of 4M tokens (512 x 8192 here).
    return _published("llama3_8b", model, seq_len=8192, batch_size=512, lr=3e-4, steps=1_200_000,
                      warmup_steps=8000, min_ratio=0.01)


def _deepseek_llm_schedule() -> fdl.Config:
    """DeepSeek LLM's multi-step schedule (arXiv:2401.02954 §2.3): 2000 warmup steps, 31.6% of
    the peak after 80% of the 2T training tokens, 10% after 90%."""
    return SCHEDULER.config("multi_stage", warmup_steps=2000, stages=[
        (1.6e12, "constant", 1.0), (1.8e12, "constant", 0.316), (2e12, "constant", 0.1)])


@recipe.preset
def deepseek_llm_7b() -> fdl.Partial:
    """DeepSeek LLM 7B (6.9B): 30 layers, dim 4096, MHA 32 heads, SwiGLU 11008, init std 0.006."""
    # Architecture, lr 4.2e-4, batch 2304 x 4096, 2T tokens (211,926 steps): arXiv:2401.02954 Table 2, §2.3.
    model = llama(vocab_size=102400, dim=4096, n_layers=30, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                  norm_eps=1e-6, init_std=0.006)
    return _published("deepseek_llm_7b", model, seq_len=4096, batch_size=2304, lr=4.2e-4, steps=211_926,
                      warmup_steps=2000, schedule=_deepseek_llm_schedule())


@recipe.preset
def deepseek_llm_67b() -> fdl.Partial:
    """DeepSeek LLM 67B: 95 layers, dim 8192, GQA 64/8, SwiGLU 22016, init std 0.006."""
    # Architecture, lr 3.2e-4, batch 4608 x 4096, 2T tokens (105,963 steps): arXiv:2401.02954 Table 2, §2.3.
    model = llama(vocab_size=102400, dim=8192, n_layers=95, n_heads=64, n_kv_heads=8, hidden_dim=22016,
                  norm_eps=1e-6, init_std=0.006)
    return _published("deepseek_llm_67b", model, seq_len=4096, batch_size=4608, lr=3.2e-4, steps=105_963,
                      warmup_steps=2000, schedule=_deepseek_llm_schedule())


@recipe.preset
def gpt2_small() -> fdl.Partial:
    """GPT-2 small (124M): 12 layers, dim 768, 12 heads, learned positions, LayerNorm, GELU MLP, tied."""
    # Architecture, context 1024 and batch 512: GPT-2 (Radford et al. 2019) §2.3, Table 2. The
    # GPT-2 paper states no optimiser settings; GPT-3 Small's are used (arXiv:2005.14165 Table 2.1,
    # App. B): lr 6e-4, warmup over 375M tokens (715 steps of 512 x 1024), cosine to 10%.
    # 600,000 steps (315B tokens) chosen: about the 300B tokens GPT-3 trained on (§2.2).
    model = gpt2(vocab_size=50257, dim=768, n_layers=12, n_heads=12, max_len=1024)
    return _published("gpt2_small", model, seq_len=1024, batch_size=512, lr=6e-4, steps=600_000, warmup_steps=715)


if __name__ == "__main__":
    recipe.main()
