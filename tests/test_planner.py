"""The planner behind --dry-run: closed forms against hand calculations, the deepseek_v3
report, and predicted peak memory against a measured peak on small CPU runs."""

from __future__ import annotations

import weakref

import fiddle as fdl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from components.train import activation_memory, comm_volume, pipeline_bubble, planner
from components.train.launch import build_model_on_meta
from components.train.plan import layout_of, plan_report
from registry import PARALLEL_PLAN, PRECISION
from tests.conftest import run_recipe


# -- closed forms ------------------------------------------------------------------------------
def test_bubble_formulas_against_hand_values():
    assert pipeline_bubble.bubble_fraction("1f1b", p=4, m=8) == pytest.approx(3 / 11)
    assert pipeline_bubble.bubble_fraction("gpipe", p=16, m=120) == pytest.approx(15 / 135)
    assert pipeline_bubble.bubble_fraction("interleaved_1f1b", p=4, m=8, v=2) == pytest.approx(3 / 19)
    # DualPipeV on 4 ranks (8 stages): bubble (4-1)(F&B + B - 3W) = 3 * (3 + 2 - 3) = 6 against
    # 2 m (F + B) = 2 * 8 * 3 = 48 of work
    assert pipeline_bubble.bubble_fraction("dualpipev", p=4, m=8) == pytest.approx(6 / 54)
    assert pipeline_bubble.bubble_fraction("1f1b", p=1, m=8) == 0.0
    assert pipeline_bubble.in_flight("1f1b", p=4, m=8) == 4 and pipeline_bubble.in_flight("1f1b", p=4, m=2) == 2
    assert pipeline_bubble.in_flight("1f1b", p=4, m=8, rank=3) == 1
    assert pipeline_bubble.in_flight("gpipe", p=4, m=8) == 8
    assert pipeline_bubble.in_flight("dualpipev", p=4, m=8) == pytest.approx(9 / 2)  # PP+1 stages of half a rank
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        pipeline_bubble.bubble_fraction("zb", p=2, m=2)


def _llama_meta(n_layers: int = 4):
    from components.families.llama.builder import llama

    with torch.device("meta"):
        return fdl.build(llama(vocab_size=256, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=128))


def _deepseek_meta():
    from recipes.deepseek_pretrain import recipe

    return build_model_on_meta(recipe.config("debug").model)


def _hand_counts(model):
    """Embedding, head (+final norm), per-layer parameter counts, written out from the modules."""
    emb = model.embedding.weight.numel()
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    rest = sum(p.numel() for p in model.parameters()) - emb - sum(layers)
    return emb, rest, layers


@pytest.mark.parametrize("degrees", [dict(), dict(dp_shard=4), dict(dp_replicate=4, zero1=True), dict(tp=2),
                                     dict(pp=2), dict(pp=2, tp=2, dp_shard=2)])
def test_dense_bytes_per_rank_against_hand_calculation(degrees):
    model = _llama_meta()
    emb, rest, layers = _hand_counts(model)
    layout = planner.PlannedLayout(**degrees)
    acts = activation_memory.measure(model, micro_batch=1, seq_len=16)
    mem = planner.memory(model, layout, planner.Precision(), acts, n_micro=1)
    tp, pp, shard = layout.tp, layout.pp, layout.dp_shard
    # the busiest rank: with pp=2 the first takes layers 0-1 and the embedding, the last 2-3,
    # the final norm and the head (equal layers: the head's rank is the larger)
    local = (emb + rest + sum(layers)) if pp == 1 else max(emb + sum(layers[:2]), rest + sum(layers[2:]))
    local = local / tp / shard
    assert mem.parameters == pytest.approx(4 * local)
    assert mem.gradients == pytest.approx(4 * local)
    zero = layout.dp_replicate if layout.zero1 else 1
    assert mem.optimizer == pytest.approx(2 * 4 * local / zero)  # AdamW: two fp32 states


def test_expert_parallel_splits_routed_experts_and_zero1_over_their_replicas():
    from components.moe.moe import MoE

    model = _deepseek_meta()
    experts = sum(sum(p.numel() for p in m.experts.parameters()) for m in model.modules() if isinstance(m, MoE))
    total = sum(p.numel() for p in model.parameters())
    layout = planner.PlannedLayout(dp_replicate=4, ep=2, zero1=True)
    (split,) = planner.split_parameters(model, layout)
    assert split.expert == pytest.approx(experts / 2) and split.dense == pytest.approx(total - experts)
    acts = activation_memory.measure(model, micro_batch=1, seq_len=16)
    mem = planner.memory(model, layout, planner.Precision(), acts, n_micro=1)
    # ZeRO-1: dense state over 4 replicas, expert state over the 4 x 1 / 2 = 2 ranks holding the same experts
    assert mem.optimizer == pytest.approx(8 * ((total - experts) / 4 + experts / 2 / 2))


def test_all_to_all_and_point_to_point_volumes_against_hand_calculation():
    model = _deepseek_meta()
    moe_layers, top_k, dim, tokens, m = 3, 2, 128, 256, 4  # debug: 3 MoE layers of 4, top-2, width 128
    prec = planner.Precision(activation=2)
    comm = comm_volume.per_step(model, planner.PlannedLayout(dp_shard=2, ep=2), prec, n_micro=m, tokens=tokens,
                                dim=dim, moe_layers=moe_layers, top_k=top_k)
    # dispatch + combine, forward + backward, half of the copies leave the rank
    assert comm["all-to-all"] == pytest.approx(m * moe_layers * 4 * tokens * top_k * dim * 2 * 0.5)
    assert comm["point-to-point"] == 0
    comm = comm_volume.per_step(model, planner.PlannedLayout(pp=2), prec, n_micro=m, tokens=tokens, dim=dim,
                                moe_layers=moe_layers, top_k=top_k)
    assert comm["point-to-point"] == pytest.approx(m * 2 * tokens * dim * 2)  # activation out, gradient back
    comm = comm_volume.per_step(model, planner.PlannedLayout(pp=2, schedule="dualpipev"), prec, n_micro=m,
                                tokens=tokens, dim=dim, moe_layers=moe_layers, top_k=top_k)
    assert comm["point-to-point"] == pytest.approx(2 * m * 2 * tokens * dim * 2)  # two stages per rank


def test_ddp_all_reduces_the_gradients_once_and_fsdp_gathers_twice_per_micro_batch():
    model = _llama_meta()
    n = sum(p.numel() for p in model.parameters())
    kw = dict(n_micro=3, tokens=64, dim=64, moe_layers=0, top_k=0)
    comm = comm_volume.per_step(model, planner.PlannedLayout(dp_replicate=2), planner.Precision(), **kw)
    assert comm["all-reduce"] == pytest.approx(4 * n) and comm["all-gather"] == 0
    comm = comm_volume.per_step(model, planner.PlannedLayout(dp_shard=2), planner.Precision(), **kw)
    # payloads: a gather's full output, a reduce-scatter's full input (forward + backward gathers)
    assert comm["all-gather"] == pytest.approx(3 * 2 * 4 * n)
    assert comm["reduce-scatter"] == pytest.approx(3 * 4 * n)


def test_bad_layouts_name_the_constraint():
    with pytest.raises(ValueError, match="ep=3 must divide"):
        planner.PlannedLayout(dp_replicate=4, ep=3)
    with pytest.raises(ValueError, match="stages but only 4 layers"):
        planner.rank_layers(_llama_meta(), planner.PlannedLayout(pp=8))


def test_layout_of_reads_the_mesh_degrees():
    from recipes.llama_pretrain import recipe

    config = recipe.config("debug")
    config.parallel = PARALLEL_PLAN.config("mesh", dp_replicate=2, zero1=True)
    assert layout_of(config) == planner.PlannedLayout(dp_replicate=2, zero1=True)


def test_deepseek_v3_dry_run_reports_the_fit_and_what_dominates():
    result = run_recipe("deepseek_v3", "--dry-run", recipe="deepseek_pretrain")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "2,048 ranks" in out and "pp=16" in out and "ep=64" in out and "zero1" in out and "dualpipev" in out
    assert "does not fit a 80 GB GPU; activations dominate" in out
    assert "with activation_checkpointing=full" in out
