"""Capabilities as interfaces: a plugin's MoE (tests/helpers/routed_moe.py, no class of ours
subclassed) that declares `RoutedExperts`, `ExpertBank`, `TensorParallel` and `ReportsExpertLoad`
gets what our MoE gets: the statistics, the planner's counts, expert and tensor parallelism
(2 processes, against one) and the expert-load report; without `TensorParallel`, tp refuses it
naming the missing capability."""

from __future__ import annotations

import json
import os

import pytest
import torch
from rich.console import Console
from torch import nn

from tessera.components.interfaces import ExpertBank, ReportsExpertLoad, RoutedExperts, TensorParallel
from tessera.components.model import stats
from tessera.components.moe.expert_parallel import expert_parallel_faults
from tessera.components.moe.moe import MoE
from tessera.components.parallel.tensor_parallel import tensor_parallel_faults
from tessera.components.train import memory_model
from tessera.components.train.dry_run import dry_run
from tessera.components.train.launch import build_model_on_meta
from tessera.components.train.metrics import moe_layer_indices
from tessera.registry import PARALLEL_PLAN, PRECISION
from tessera.registry.kinds import FEED_FORWARD

from helpers.forked_ranks import run_ranks
from helpers.launch import worker
from helpers.routed_moe import RoutedMoE, UnsplitMoE, decoder_config, hand_counts

SHAPE = dict(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2, hidden=16)


def test_ours_and_the_plugin_declare_the_capabilities():
    from tessera.components.attention.gqa import GroupedQueryAttention
    from tessera.components.attention.mla import MultiHeadLatentAttention
    from tessera.components.mlp.gated import SwiGLU
    from tessera.components.mlp.mlp import MLP
    from tessera.components.moe.experts import GroupedExperts

    assert issubclass(MoE, RoutedExperts) and issubclass(MoE, TensorParallel)
    assert issubclass(GroupedExperts, ExpertBank)
    assert all(issubclass(kind, TensorParallel)
               for kind in (GroupedQueryAttention, MultiHeadLatentAttention, SwiGLU, MLP))
    assert not issubclass(RoutedMoE, MoE) and not issubclass(UnsplitMoE, TensorParallel)
    model = build_model_on_meta(decoder_config())
    assert moe_layer_indices(model, ReportsExpertLoad) == [0, 1]  # the trainer logs its loads


def test_statistics_count_a_plugin_moe_like_ours():
    seq_len = 64
    model = build_model_on_meta(decoder_config(**SHAPE))
    hand = hand_counts(**SHAPE, seq_len=seq_len)
    assert stats.count_parameters(model) == hand["parameters"]
    assert stats.activated_parameters(model, include_embedding=False) == pytest.approx(hand["activated"])
    assert stats.training_flops_per_token(model, seq_len) == pytest.approx(hand["flops"])


def test_dry_run_and_plan_count_a_plugin_moe_swapped_in_by_name(temporary_entries, monkeypatch):
    """The llama debug recipe with every feed-forward swapped for the registered plugin, planned
    for FSDP x EP on 2 processes: the dry run's counts are the hand counts, and the plan splits
    the routed experts over ep and predicts their all-to-all from the plugin's top_k."""
    from tessera.cli import resolve
    from tessera.recipes.llama_pretrain import recipe

    FEED_FORWARD.register("routed_moe")(RoutedMoE)
    swap = "model.layers[*].feed_forward=@routed_moe(n_experts=4,top_k=2,hidden_dim=64)"
    config, _ = resolve(recipe, ["debug", swap])
    config.parallel = PARALLEL_PLAN.config("mesh", dp_shard=2, ep=2)
    config.precision = PRECISION.config("fp32")
    config.seq_len, config.batch_size = 32, 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    with open(os.devnull, "w") as quiet:
        report = dry_run(config, console=Console(file=quiet))
    # the llama debug model: 6 layers, width 192, 6 query and 2 key/value heads, vocabulary 2048
    shape = dict(vocab=2048, dim=192, n_layers=6, n_heads=6, n_kv_heads=2, n_experts=4, top_k=2, hidden=64)
    hand = hand_counts(**shape, seq_len=32)
    assert report["parameters"] == hand["parameters"]
    assert report["activated_excluding_embedding"] == pytest.approx(hand["activated"])
    assert report["training_flops_per_token"] == pytest.approx(hand["flops"])

    model = build_model_on_meta(config.model)
    routed = 6 * 2 * 4 * 64 * 192
    (split,) = memory_model.rank_parameters(model, report["per_rank"]["layout"])
    assert split.expert == pytest.approx(routed / 2)  # each process holds half the experts
    tokens, n_micro = 32, report["per_rank"]["n_micro"]  # one sequence per process
    # dispatch + combine, forward + backward, of top_k copies per token; half leave the process
    all_to_all = report["per_rank"]["communication"]["all-to-all"]
    assert all_to_all == pytest.approx(n_micro * 6 * 4 * tokens * 2 * 192 * 4 / 2)


def test_tensor_parallel_splits_the_plugin_or_names_the_missing_capability():
    assert tensor_parallel_faults(decoder_config(), 2) == []
    # routing and experts are replicated: an expert width tp does not divide is no fault
    assert tensor_parallel_faults(decoder_config(hidden=15), 2) == []
    faults = tensor_parallel_faults(decoder_config(moe=UnsplitMoE), 2)
    assert faults == [f"model.layers[{i}].feed_forward is a UnsplitMoE, which has no tensor-parallel plan (it does "
                      "not implement tessera.components.interfaces.TensorParallel); use mlp, a gated MLP or moe, "
                      "or tp=1" for i in range(2)]


def test_expert_parallel_faults_read_the_plugin_through_its_interfaces():
    model = build_model_on_meta(decoder_config())
    assert expert_parallel_faults(model, 2) == [] and expert_parallel_faults(model, 4) == []
    (fault, _) = expert_parallel_faults(model, 3)
    assert fault.startswith("model.layers[0].feed_forward: ep=3 does not divide its 4 routed experts")
    with torch.device("meta"):
        model.layers[1].feed_forward.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
    (fault,) = expert_parallel_faults(model, 2)
    assert fault.startswith("model.layers[1].feed_forward: its routed experts are a ModuleList, which is not an "
                            "ExpertBank")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("capabilities") / "result.json"
    done = run_ranks(worker("capabilities"), str(out), timeout=300)  # tests/ on the path: helpers.routed_moe
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("label", ["ep", "tp"])
def test_plugin_moe_under_expert_and_tensor_parallelism_trains_like_one_process(two_processes, label):
    """ep=2: each process holds 2 of the 4 experts of every layer and exchanges tokens; tp=2:
    routing and experts replicated, attention split. Both train as one process does."""
    result = two_processes[label]
    assert result["losses"] == pytest.approx(two_processes["reference"], rel=1e-5)
    assert two_processes["reference"][1] < two_processes["reference"][0]  # the step moved the weights
    assert result["diff"] < 1e-5
    if label == "ep":
        assert result["expert_local_shape"] == [2, 16, 32]  # [E / ep, F, D]
        assert all(n > 0 for n in result["sent"] + result["received"])  # rows went both ways
    else:
        assert result["plain"] == [] and result["expert_local_shape"] == [4, 16, 32]  # replicated experts
