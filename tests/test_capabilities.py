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

from helpers.launch import torchrun
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


RUN = '''
import json
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from helpers.routed_moe import decoder_config
from tessera.components.moe.expert_parallel import apply_expert_parallel, reduce_expert_gradients
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.parallel.sharding import materialize_sharded
from tessera.components.parallel.tensor_parallel import apply_tensor_parallel
from tessera.components.train.launch import build_model_on_meta

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
STEPS, BATCH, SEQ, VOCAB = 2, 4, 16, 64


def build(split):
    torch.manual_seed(0)
    model = build_model_on_meta(decoder_config(vocab=VOCAB))
    if split is None:
        model.to_empty(device="cpu")
        model.init_weights()
    else:
        split(model)
        materialize_sharded(model, "cpu")
    return model


def average_plain_gradients(model):
    """What DDP does for the parameters outside the experts (ep shards see different rows)."""
    for param in model.parameters():
        if param.grad is not None and not isinstance(param.grad, DTensor):
            dist.all_reduce(param.grad)
            param.grad /= world
    reduce_expert_gradients(model)


def train(model, rows, sync):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)[rows]
        loss = sum(model.losses(tokens[:, :-1], tokens[:, 1:]).values())
        loss.backward()
        if sync is not None:
            sync(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def full(param):
    return param.full_tensor() if isinstance(param, DTensor) else param


reference = build(None)
result = {"reference": train(reference, slice(None), None)}
mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
for label, split, rows, sync in (
        ("ep", lambda m: apply_expert_parallel(m, mesh), mine, average_plain_gradients),
        ("tp", lambda m: apply_tensor_parallel(m, mesh), slice(None), None)):
    model = build(split)
    losses = torch.tensor(train(model, rows, sync))
    if label == "ep":  # each process's loss is over its own rows
        dist.all_reduce(losses)
        losses /= world
    bank = model.layers[0].feed_forward.routed_experts
    result[label] = dict(
        losses=losses.tolist(),
        diff=max((full(p) - r).abs().max().item()
                 for p, r in zip(model.parameters(), reference.parameters(), strict=True)),
        expert_local_shape=list(bank.w_in.to_local().shape),
        plain=[name for name, p in model.named_parameters() if not isinstance(p, DTensor)],
        sent=getattr(bank.expert_parallel, "sent", None), received=getattr(bank.expert_parallel, "received", None))
if rank == 0:
    print("RESULT", json.dumps(result), flush=True)
leave_process_group()
'''


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    script = tmp_path_factory.mktemp("capabilities") / "run.py"
    script.write_text(RUN)
    done = torchrun(script, timeout=300)  # tests/ on the children's path: helpers.routed_moe imports
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])


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
