"""DeepSeek pretraining: multi-head latent attention, DeepSeekMoE with shared experts and
auxiliary-loss-free balancing, multi-token prediction.

    python recipes/deepseek_pretrain.py                  # debug: trains on 2 CPU cores in minutes
    python recipes/deepseek_pretrain.py deepseek_v3 --dry-run

Presets follow the papers (shared/reference/deepseek.md): architecture, AdamW settings,
clipping, init std, LR schedules, batch ramps, balance weights, bias speed and MTP weight.
"""

from __future__ import annotations

import math

import fiddle as fdl

from components.data.defaults import stdlib_corpus
from components.families.deepseek.builder import MHASpec, MLASpec, MoESpec, deepseek
from components.train.batch_ramp import BatchRamp
from components.train.outputs import run_outputs
from components.train.trainer import train
from registry import OPTIMIZER, PARALLEL_PLAN, PRECISION, SCHEDULER, Recipe

DEBUG_VOCAB = 2048  # a small BPE trained on the default corpus: cheap softmax on 2 cores

recipe = Recipe(name="deepseek_pretrain", doc=__doc__)

SEQ = 4096  # pretraining context of every DeepSeek model


def adamw(lr: float) -> fdl.Partial:
    """AdamW as in every DeepSeek paper: beta1 0.9, beta2 0.95, weight decay 0.1 (eps unstated)."""
    return OPTIMIZER.partial("adamw", lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def step_decay(total_tokens: float, first: float = 0.8) -> fdl.Config:
    """DeepSeek LLM / MoE / V2 schedule: 2000 warmup steps, x0.316 at `first` and again at 90% of tokens."""
    return SCHEDULER.config("multi_stage", warmup_steps=2000, stages=[
        (first * total_tokens, "constant", 1.0), (0.9 * total_tokens, "constant", 0.316),
        (total_tokens, "constant", 0.316 ** 2)])


def steps_for(tokens: float, batch: int, ramp: BatchRamp | None = None) -> int:
    """Optimizer steps to consume `tokens` at `batch` sequences of SEQ tokens (a linear ramp averages)."""
    if ramp is None:
        return math.ceil(tokens / (batch * SEQ))
    ramp_steps = ramp.ramp_tokens / ((ramp.start_batch + batch) / 2 * SEQ)
    return math.ceil(ramp_steps + (tokens - ramp.ramp_tokens) / (batch * SEQ))


@recipe.preset(default=True)
def debug() -> fdl.Partial:
    """MLA + MoE (8 routed, 1 shared, aux-free bias) + MTP, precision auto: a minute or two on 2 CPU cores.

    Precision `auto` computes in bf16 where this machine runs it faster than fp32, else in fp32."""
    steps = 300
    model = deepseek(
        vocab_size=DEBUG_VOCAB, dim=128, n_layers=4, n_dense_layers=1, dense_hidden_dim=384,
        attention=MLASpec(n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                          v_head_dim=32),
        moe=MoESpec(n_routed=8, n_shared=1, top_k=2, hidden_dim=96, score_func="sigmoid", n_groups=2, topk_groups=1,
                    group_score="top2_sum", normalize_weights=True, scaling_factor=1.0, aux_free_bias=True,
                    bias_update_speed=0.001, balance_alpha=1e-4),
        mtp_depth=1, mtp_loss_weight=0.3, init_std=0.02)
    return fdl.Partial(
        train, model=model, data=stdlib_corpus(vocab_size=DEBUG_VOCAB), optimizer=adamw(lr=3e-3),
        scheduler=SCHEDULER.config("warmup_cosine", warmup_steps=30, total_steps=steps, min_ratio=0.1),
        parallel=PARALLEL_PLAN.config("single"), steps=steps, batch_size=16, seq_len=128, grad_clip=1.0,
        precision=PRECISION.config("auto"), seed=0, **run_outputs("runs/deepseek_pretrain/debug", every=100))


def _full_run(name: str, model: fdl.Config, *, lr: float, schedule: fdl.Config, batch: int, steps: int,
              ramp: BatchRamp | None = None) -> fdl.Partial:
    """Preset `name`, a published-size run: the debug run's pipeline with the paper's model
    and optimisation, reporting and checkpointing every 1000 steps to runs/deepseek_pretrain/NAME."""
    config = debug()
    for key, value in run_outputs(f"runs/deepseek_pretrain/{name}", every=1000).items():
        setattr(config, key, value)
    config.model = model
    config.optimizer = adamw(lr)
    config.scheduler = schedule
    config.steps, config.batch_size, config.seq_len, config.micro_batch_size = steps, batch, SEQ, 1
    config.batch_ramp = fdl.Config(BatchRamp, start_batch=ramp.start_batch, ramp_tokens=ramp.ramp_tokens) \
        if ramp else None
    config.precision = PRECISION.config("bf16")  # DeepSeek LLM / MoE / V2 trained in bf16 (V3: fp8, below)
    return config


@recipe.preset
def deepseek_moe_16b() -> fdl.Partial:
    """DeepSeekMoE 16B (16.4B total / 2.8B activated): MHA, 64 routed + 2 shared experts, top-6."""
    model = deepseek(vocab_size=102400, dim=2048, n_layers=28, n_dense_layers=1, dense_hidden_dim=10944,
                     attention=MHASpec(n_heads=16, head_dim=128),
                     moe=MoESpec(n_routed=64, n_shared=2, top_k=6, hidden_dim=1408, balance_alpha=0.001))
    # 2T tokens, batch 4608 x 4K; decay at 80% / 90% of steps.
    return _full_run("deepseek_moe_16b", model, lr=4.2e-4, schedule=step_decay(2e12), batch=4608, steps=106_449)


@recipe.preset
def deepseek_v2_lite() -> fdl.Partial:
    """DeepSeek-V2-Lite (15.7B / 2.4B): MLA without query compression, 64 routed + 2 shared, top-6."""
    model = deepseek(vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, dense_hidden_dim=10944,
                     attention=MLASpec(n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                       v_head_dim=128),
                     moe=MoESpec(n_routed=64, n_shared=2, top_k=6, hidden_dim=1408, balance_alpha=0.001))
    return _full_run("deepseek_v2_lite", model,
                     lr=4.2e-4, schedule=step_decay(5.7e12), batch=4608, steps=steps_for(5.7e12, 4608))


@recipe.preset
def deepseek_v2() -> fdl.Partial:
    """DeepSeek-V2 (236B / 21B): MLA, 160 routed + 2 shared, device-limited top-6 (M=3 of 8), token dropping."""
    model = deepseek(vocab_size=102400, dim=5120, n_layers=60, n_dense_layers=1, dense_hidden_dim=12288,
                     attention=MLASpec(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                       qk_rope_head_dim=64, v_head_dim=128),
                     moe=MoESpec(n_routed=160, n_shared=2, top_k=6, hidden_dim=1536, n_groups=8, topk_groups=3,
                                 group_score="max", scaling_factor=16.0, balance_alpha=0.003,
                                 device_balance_alpha=0.05, n_devices=8, capacity_factor=1.0))
    ramp = BatchRamp(start_batch=2304, ramp_tokens=225e9)
    return _full_run("deepseek_v2", model, lr=2.4e-4, schedule=step_decay(8.1e12, first=0.6), batch=9216,
                     steps=steps_for(8.1e12, 9216, ramp), ramp=ramp)


@recipe.preset
def deepseek_v3() -> fdl.Partial:
    """DeepSeek-V3 (671B / 37B): MLA, 256 routed + 1 shared, node-limited top-8, aux-free bias, MTP depth 1."""
    model = deepseek(vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, dense_hidden_dim=18432,
                     attention=MLASpec(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                       qk_rope_head_dim=64, v_head_dim=128),
                     moe=MoESpec(n_routed=256, n_shared=1, top_k=8, hidden_dim=2048, score_func="sigmoid",
                                 n_groups=8, topk_groups=4, group_score="top2_sum", normalize_weights=True,
                                 scaling_factor=2.5, aux_free_bias=True, bias_update_speed=0.001,
                                 balance_alpha=1e-4),
                     mtp_depth=1, mtp_loss_weight=0.3)
    schedule = SCHEDULER.config("multi_stage", warmup_steps=2000, stages=[
        (10e12, "constant", 1.0), (14.3e12, "cosine", 0.1), (14.633e12, "constant", 0.1),
        (14.8e12, "constant", 7.3e-6 / 2.2e-4)])
    ramp = BatchRamp(start_batch=3072, ramp_tokens=469e9)
    config = _full_run("deepseek_v3", model,
                       lr=2.2e-4, schedule=schedule, batch=15360, steps=steps_for(14.8e12, 15360, ramp),
                       ramp=ramp)
    config.precision = PRECISION.config("fp8")  # V3 §3.3: fp8 GEMMs in the blocks, bf16/fp32 elsewhere
    config.scheduled = {  # lambda 0.3 for the first 10T tokens then 0.1; gamma 0.001 until 14.3T then 0
        "mtp_loss_weight": SCHEDULER.config("token_steps", values=[0.3, 0.1], boundaries=[10e12]),
        "bias_update_speed": SCHEDULER.config("token_steps", values=[0.001, 0.0], boundaries=[14.3e12]),
    }
    return config


if __name__ == "__main__":
    recipe.main()
