"""DeepSeek pretraining: multi-head latent attention, DeepSeekMoE with shared experts and
auxiliary-loss-free balancing, multi-token prediction.

    python recipes/deepseek_pretrain.py                  # debug: trains on 2 CPU cores in minutes
    python recipes/deepseek_pretrain.py deepseek_v3 --dry-run

The published-size presets follow the papers: DeepSeek LLM (arXiv:2401.02954), DeepSeekMoE
(arXiv:2401.06066), DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437), for
architecture, AdamW settings, clipping, init std, LR schedules, batch ramps, balance weights,
bias speed and MTP weight; each preset's comments give the section.
"""

from __future__ import annotations

import math

import fiddle as fdl

from tessera.cli import Recipe
from tessera.components.data.defaults import stdlib_corpus
from tessera.components.families.deepseek.builder import MHASpec, MLASpec, MoESpec, deepseek
from tessera.components.train.batch_ramp import BatchRamp
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.outputs import run_outputs
from tessera.components.train.step_options import StepOptions
from tessera.components.train.trainer import train
from tessera.registry import OPTIMIZER, PARALLEL_PLAN, PRECISION, SCHEDULER

# Chosen for the debug run: a BPE this small keeps the softmax cheap on 2 CPU cores while still
# merging the corpus's common words (the papers' 100K-129K vocabularies would dominate the cost).
DEBUG_VOCAB = 2048

recipe = Recipe(name="deepseek_pretrain", doc=__doc__)

SEQ = 4096  # pretraining context of every DeepSeek model (V2 §3.1.2, V3 §4.2; LLM §2.3)


def adamw(lr: float) -> fdl.Partial:
    """AdamW as in every DeepSeek paper (V3 §4.2, V2 §3.1.2): beta1 0.9, beta2 0.95, weight
    decay 0.1 (eps unstated: torch's default)."""
    return OPTIMIZER.partial("adamw", lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def step_decay(total_tokens: float, first: float = 0.8) -> fdl.Config:
    """DeepSeek LLM / MoE / V2 schedule (LLM §2.3, MoE §5.1.2, V2 §3.1.2): 2000 warmup steps,
    x0.316 at `first` of the tokens and again at 90%."""
    return SCHEDULER.config("multi_stage", warmup_steps=2000, stages=[
        (first * total_tokens, "constant", 1.0), (0.9 * total_tokens, "constant", 0.316),
        (total_tokens, "constant", 0.316 ** 2)])


def steps_for(tokens: float, batch: int, ramp: BatchRamp | None = None) -> int:
    """Optimizer steps to consume `tokens` at `batch` sequences of SEQ tokens (a linear ramp averages)."""
    if ramp is None:
        return math.ceil(tokens / (batch * SEQ))
    ramp_steps = ramp.ramp_tokens / ((ramp.start_batch + batch) / 2 * SEQ)
    return math.ceil(ramp_steps + (tokens - ramp.ramp_tokens) / (batch * SEQ))


def stability_guard() -> fdl.Config[StabilityGuard]:
    """Every preset's guard: skip non-finite or spiking steps, roll back to the last checkpoint
    after 3 in a row (at most 3 times), then stop the run with what went wrong and what to try."""
    return fdl.Config(StabilityGuard)


@recipe.preset(default=True)
def debug() -> fdl.Partial:
    """MLA + MoE (8 routed, 1 shared, aux-free bias) + MTP, Muon, precision auto: about a minute on 2 CPU cores.

    A DeepSeek-V3-shaped model (arXiv:2412.19437 §2) scaled down to 4 layers of width 128,
    trained for 170 steps on the default offline corpus (Python standard library code,
    docstrings and pydoc topics) with a 2048-token BPE, with Muon on every hidden matrix and a
    warmup-stable-decay schedule. It reaches the loss `debug_baseline` (AdamW, 300 steps) ends
    at after 140 steps, in about half the baseline's wall time (docs/performance/time-to-quality.md,
    with the ablation of each choice below). Precision `auto` computes in bf16 where this
    machine runs it faster than fp32, else in fp32. Muon trains under FSDP, tensor and expert
    parallelism as one process does (tests/test_muon_sharded.py); ZeRO-1
    (`@mesh(..., zero1=True)`) refuses it (it rebuilds the optimizer per partition from one
    class's settings): start from `debug_baseline` there, or shard with FSDP (`dp_shard`).
    The optimisation is chosen for this run, not taken from a paper, except where a comment
    cites one."""
    # chosen: the fewest steps (10 apart) whose run reaches debug_baseline's final loss (about
    # 5.01 on the fixed validation set) with the settings below: it passes it at step 140, where
    # runs of 130 and 140 steps end above it (5.048, 5.012; seed 0)
    steps = 170
    return fdl.Partial(
        train, model=_debug_model(),
        data=stdlib_corpus(vocab_size=DEBUG_VOCAB),
        # Muon on every hidden matrix, each expert's matrix of the stacks included (Moonlight,
        # arXiv:2502.16982, trains its MoE model with Muon; its update-RMS matching, §2.2, lets
        # Muon share AdamW's learning-rate scale); AdamW on embeddings, head, norms. Chosen by
        # loss at a fixed step (seed 0): momentum 0.8 instead of 0.95 (-0.04 nats at step 140 in
        # this short run; 0.7 and 0.85 alike, 0.9 half the gain), with it Muon lr 3e-3 (2e-3
        # +0.015, 4e-3 alike, 1e-2 +0.05 nats), AdamW lr 2e-2 for the embedding and head (1e-2,
        # 3e-2 worse); batched: one Newton-Schulz iteration per matrix shape, a third of the
        # optimizer's time on 2 CPU cores; 3 Newton-Schulz iterations instead of torch's 5 (the
        # step ~5% cheaper, the loss at step 150 within 0.01 nats; 2: +0.013).
        optimizer=OPTIMIZER.partial("muon", lr=3e-3, momentum=0.8, adamw_lr=2e-2, weight_decay=0.1,
                                    adamw_betas=(0.9, 0.95), expert_stacks="muon", batched=True, ns_steps=3),
        # Warmup-stable-decay (MiniCPM, arXiv:2404.06395 §4): 10 warmup steps, decay to 0 over the
        # last half (chosen: a longer decay ended lower than 0.3-0.4 in this short run) shaped
        # 1 - sqrt (arXiv:2405.18392 §3; chosen: 0.02-0.03 nats below a linear one from step 150)
        scheduler=SCHEDULER.config("wsd", warmup_steps=10, total_steps=steps, decay_fraction=0.5, min_ratio=0.0,
                                   shape="sqrt"),
        parallel=PARALLEL_PLAN.config("single"),
        steps=steps,
        # chosen: 16 x 128; 8 sequences reached a loss in 10% fewer tokens but pay Muon's fixed
        # cost per step twice as often
        batch_size=16, seq_len=128,
        step=fdl.Config(StepOptions, grad_clip=1.0),  # the papers' clipping (V3 §4.2)
        precision=PRECISION.config("auto"), guard=stability_guard(), seed=0,
        # chosen: validation and the held-out cloze task at the end only (each costs steps' time)
        **run_outputs("runs/deepseek_pretrain/debug", every=steps, downstream="heldout_cloze"))


@recipe.preset
def debug_baseline() -> fdl.Partial:
    """`debug` as it was when the time-to-quality work started (AdamW, 300 steps of 16 x 128
    tokens): the reference `benchmarks/time_to_quality.py` measures against, frozen here so
    that the comparison stays reproducible when `debug` changes."""
    steps = 300  # chosen: enough for the loss to fall well below the unigram entropy in a few minutes
    return fdl.Partial(
        train, model=_debug_model(),
        data=stdlib_corpus(vocab_size=DEBUG_VOCAB),
        optimizer=adamw(lr=3e-3),  # chosen: the papers' 2-4e-4 suits billions of parameters, not 1M
        # chosen: 10% warmup (30 steps), cosine to 10% of the peak
        scheduler=SCHEDULER.config("warmup_cosine", warmup_steps=30, total_steps=steps, min_ratio=0.1),
        parallel=PARALLEL_PLAN.config("single"),
        steps=steps,
        batch_size=16, seq_len=128,  # chosen: 2048 tokens a step keeps a step under a second on 2 cores
        step=fdl.Config(StepOptions, grad_clip=1.0),  # the papers' clipping (V3 §4.2)
        precision=PRECISION.config("auto"), guard=stability_guard(), seed=0,
        # chosen: the built-in held-out cloze task beside the loss (about 1.5% of the run's time)
        **run_outputs("runs/deepseek_pretrain/debug_baseline", every=100, downstream="heldout_cloze"))


def _debug_model() -> fdl.Config:
    """The model of every debug preset: DeepSeek-V3's architecture at width 128."""
    return deepseek(
        # Chosen: the smallest widths where every MLA and MoE feature is exercised; 1 dense
        # layer before the MoE ones as V2/V3 have (V3 has 3 of 61, V2 1 of 60).
        vocab_size=DEBUG_VOCAB, dim=128, n_layers=4, n_dense_layers=1, dense_hidden_dim=384,
        attention=MLASpec(n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                          v_head_dim=32),
        # V3's routing (§2.1.2): sigmoid scores, group-limited top-k, normalised weights, aux-free
        # bias at speed 0.001 and sequence-wise balance weight 1e-4 (§4.2); 8 experts in 2 groups chosen.
        moe=MoESpec(n_routed=8, n_shared=1, top_k=2, hidden_dim=96, score_func="sigmoid", n_groups=2, topk_groups=1,
                    group_score="top2_sum", normalize_weights=True, scaling_factor=1.0, aux_free_bias=True,
                    bias_update_speed=0.001, balance_alpha=1e-4),
        # MTP depth 1 with weight 0.3 (V3 §2.2, §4.2); init std 0.02 chosen: 0.006 (the papers')
        # trains too slowly at width 128 to show progress in 300 steps.
        mtp_depth=1, mtp_loss_weight=0.3, init_std=0.02)


def _full_run(name: str, model: fdl.Config, *, lr: float, schedule: fdl.Config, batch: int, steps: int,
              precision: fdl.Config, ramp: BatchRamp | None = None,
              parallel: fdl.Config | None = None) -> fdl.Partial:
    """Preset `name`, a published-size run on GPUs: the paper's model, optimisation and
    parallel plan (`parallel`; None: FSDP over every process, where the paper states none),
    reporting and checkpointing every 1000 steps to runs/deepseek_pretrain/NAME. Everything
    is stated here; nothing comes from `debug`."""
    return fdl.Partial(
        train, model=model,
        # The papers' corpora (2T-14.8T tokens) are not public: the default offline corpus stands
        # in, so that the preset runs as given; point `data` at a real corpus for a real run.
        data=stdlib_corpus(vocab_size=DEBUG_VOCAB),
        optimizer=adamw(lr), scheduler=schedule,
        # None of these fits one device: `--dry-run` plans per-GPU memory for the layout
        parallel=parallel or PARALLEL_PLAN.config("fsdp"), device="cuda",
        steps=steps, batch_size=batch, seq_len=SEQ,
        step=fdl.Config(
            StepOptions,
            micro_batch_size=1,  # chosen: one 4K sequence per forward bounds activation memory
            batch_ramp=fdl.Config(BatchRamp, start_batch=ramp.start_batch, ramp_tokens=ramp.ramp_tokens)
            if ramp else None,
            grad_clip=1.0),  # every paper clips at 1.0 (LLM §2.3, MoE §5.1.2, V2 §3.1.2, V3 §4.2)
        precision=precision, guard=stability_guard(), seed=0,
        **run_outputs(f"runs/deepseek_pretrain/{name}", every=1000))


@recipe.preset
def deepseek_moe_16b() -> fdl.Partial:
    """DeepSeekMoE 16B (16.4B total / 2.8B activated): MHA, 64 routed + 2 shared experts, top-6."""
    # Architecture and balance weight 0.001: DeepSeekMoE (arXiv:2401.06066) §5.1.2, Table 7.
    model = deepseek(vocab_size=102400, dim=2048, n_layers=28, n_dense_layers=1, dense_hidden_dim=10944,
                     attention=MHASpec(n_heads=16, head_dim=128),
                     moe=MoESpec(n_routed=64, n_shared=2, top_k=6, hidden_dim=1408, balance_alpha=0.001))
    # MoE §5.1.2: 2T tokens, batch 4608 x 4K, lr 4.2e-4, decay at 80% / 90%, 106,449 steps.
    # bf16 here and in V2 (below): DeepSeek LLM's training precision (arXiv:2401.02954 §2.4).
    return _full_run("deepseek_moe_16b", model, lr=4.2e-4, schedule=step_decay(2e12), batch=4608, steps=106_449,
                     precision=PRECISION.config("bf16"))


@recipe.preset
def deepseek_v2_lite() -> fdl.Partial:
    """DeepSeek-V2-Lite (15.7B / 2.4B): MLA without query compression, 64 routed + 2 shared, top-6."""
    # Architecture and balance weight 0.001: DeepSeek-V2 (arXiv:2405.04434) App. B.1.
    model = deepseek(vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, dense_hidden_dim=10944,
                     attention=MLASpec(n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                       v_head_dim=128),
                     moe=MoESpec(n_routed=64, n_shared=2, top_k=6, hidden_dim=1408, balance_alpha=0.001))
    # V2 App. B.1: 5.7T tokens at a constant 4608 x 4K batch, lr 4.2e-4, decay at 80% / 90%.
    return _full_run("deepseek_v2_lite", model, lr=4.2e-4, schedule=step_decay(5.7e12), batch=4608,
                     steps=steps_for(5.7e12, 4608), precision=PRECISION.config("bf16"))


@recipe.preset
def deepseek_v2() -> fdl.Partial:
    """DeepSeek-V2 (236B / 21B): MLA, 160 routed + 2 shared, device-limited top-6 (M=3 of 8), token dropping."""
    # Architecture, routing (D=8, M=3), scaling 16, balance weights 0.003 / 0.05 and capacity 1.0:
    # DeepSeek-V2 (arXiv:2405.04434) §2.1-2.2, §3.1.2.
    model = deepseek(vocab_size=102400, dim=5120, n_layers=60, n_dense_layers=1, dense_hidden_dim=12288,
                     attention=MLASpec(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                       qk_rope_head_dim=64, v_head_dim=128),
                     moe=MoESpec(n_routed=160, n_shared=2, top_k=6, hidden_dim=1536, n_groups=8, topk_groups=3,
                                 group_score="max", scaling_factor=16.0, balance_alpha=0.003,
                                 device_balance_alpha=0.05, n_devices=8, capacity_factor=1.0))
    # V2 §3.1.2: batch 2304 -> 9216 over the first 225B tokens, 8.1T tokens, lr 2.4e-4, decay
    # at 60% / 90%.
    ramp = BatchRamp(start_batch=2304, ramp_tokens=225e9)
    # V2 §3.1.3: 16-way zero-bubble pipeline, 8-way expert, ZeRO-1 data parallelism, no tensor
    # parallelism. The GPU count is not stated: 8 data-parallel ranks per stage (128 GPUs) chosen,
    # the fewest that EP8 can be carved from; 1F1B stands in for the zero-bubble schedule.
    plan = PARALLEL_PLAN.config("mesh", dp_replicate=8, pp=16, ep=8, zero1=True, schedule="1F1B")
    return _full_run("deepseek_v2", model, lr=2.4e-4, schedule=step_decay(8.1e12, first=0.6), batch=9216,
                     steps=steps_for(8.1e12, 9216, ramp), ramp=ramp, precision=PRECISION.config("bf16"),
                     parallel=plan)


@recipe.preset
def deepseek_v3() -> fdl.Partial:
    """DeepSeek-V3 (671B / 37B): MLA, 256 routed + 1 shared, node-limited top-8, aux-free bias, MTP depth 1."""
    # Architecture, routing (8 groups, M=4), scaling 2.5, gamma 0.001, alpha 1e-4, MTP lambda 0.3:
    # DeepSeek-V3 (arXiv:2412.19437) §2.1-2.2, §4.2.
    model = deepseek(vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, dense_hidden_dim=18432,
                     attention=MLASpec(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                                       qk_rope_head_dim=64, v_head_dim=128),
                     moe=MoESpec(n_routed=256, n_shared=1, top_k=8, hidden_dim=2048, score_func="sigmoid",
                                 n_groups=8, topk_groups=4, group_score="top2_sum", normalize_weights=True,
                                 scaling_factor=2.5, aux_free_bias=True, bias_update_speed=0.001,
                                 balance_alpha=1e-4),
                     mtp_depth=1, mtp_loss_weight=0.3)
    # V3 §4.2: 2000 warmup steps to 2.2e-4, constant to 10T tokens, cosine to 2.2e-5 at 14.3T,
    # 2.2e-5 for 333B tokens, 7.3e-6 for the last 167B; batch 3072 -> 15360 over 469B tokens.
    schedule = SCHEDULER.config("multi_stage", warmup_steps=2000, stages=[
        (10e12, "constant", 1.0), (14.3e12, "cosine", 0.1), (14.633e12, "constant", 0.1),
        (14.8e12, "constant", 7.3e-6 / 2.2e-4)])
    ramp = BatchRamp(start_batch=3072, ramp_tokens=469e9)
    config = _full_run("deepseek_v3", model,
                       lr=2.2e-4, schedule=schedule, batch=15360, steps=steps_for(14.8e12, 15360, ramp),
                       ramp=ramp,
                       precision=PRECISION.config("fp8"),  # V3 §3.3: fp8 GEMMs in the blocks, bf16/fp32 elsewhere
                       # V3 §3.2: 2,048 GPUs as 16-way pipeline (DualPipe, §3.2.1) x 64-way expert
                       # parallelism over 8 nodes x ZeRO-1 data parallelism, no tensor parallelism:
                       # 128 data-parallel ranks per stage, EP64 carved out of them. DualPipeV is
                       # DualPipe folded onto half the ranks (one copy of the parameters, not two).
                       parallel=PARALLEL_PLAN.config("mesh", dp_replicate=128, pp=16, ep=64, zero1=True,
                                                     schedule="DualPipeV"))
    config.step.scheduled = {  # lambda 0.3 for the first 10T tokens then 0.1; gamma 0.001 until 14.3T then 0
        "mtp_loss_weight": SCHEDULER.config("token_steps", values=[0.3, 0.1], boundaries=[10e12]),
        "bias_update_speed": SCHEDULER.config("token_steps", values=[0.001, 0.0], boundaries=[14.3e12]),
    }
    return config


if __name__ == "__main__":
    recipe.main()
