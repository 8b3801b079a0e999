"""Tensor + sequence parallelism: TP=2 (sequence-parallel or not, vocab-parallel loss or
gathered logits) and FSDP x TP on 2 x 2 processes train the llama and DeepSeek debug models
(MLA + MoE + MTP) exactly as one process does; models that tp cannot split are refused with
the constraint they break.

Each process count is launched once (torchrun, gloo, 1 thread per rank); every case trains
the parallel model and, inside the same processes, the single-process reference on the same
batches, and rank 0 prints what the tests compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from tessera.cli import resolve
from tessera.components.parallel.tensor_parallel import (
    TensorParallelError,
    apply_tensor_parallel,
    tensor_parallel_faults,
)
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tests.conftest import ROOT

RUN = '''
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tessera.components.interfaces import OptimizerStepHook
from tessera.components.model.decoder import cross_entropy
from tessera.components.parallel import sharding
from tessera.components.parallel.tensor_parallel import apply_tensor_parallel
from tessera.components.train.divergence import clip_gradients
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.cli import resolve

torch.set_num_threads(1)
dist.init_process_group("gloo")
RECIPES = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}
STEPS, BATCH, SEQ = 3, 4, 32


def full(param):
    return param.full_tensor() if isinstance(param, DTensor) else param


def build(config, mesh, case):
    torch.manual_seed(0)
    model = build_model_on_meta(config.model)
    if mesh is None:  # one process's model, initialised as the single-process plan does
        model.to_empty(device="cpu")
        if case["tied"]:  # to_empty gives each module its own copy of a shared parameter: share it again
            model.head.weight = model.embedding.weight
        model.init_weights()
        return model
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=case["sp"], loss_parallel=case["loss_parallel"])
    if case["dp"] > 1:  # FSDP2 over the data-parallel dim, after TP
        sharding.shard(model, mesh["dp"], reshard_after_forward=True, param_dtype=None, reduce_dtype=None)
    sharding.materialize_sharded(model, "cpu")
    return model


def step(model, optimizer, tokens, doc_ids, dp_group):
    terms = model.losses(tokens[:, :-1], tokens[:, 1:], doc_ids=doc_ids)
    torch.stack(list(terms.values())).sum().backward()
    norm, _ = clip_gradients(list(model.named_parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    for module in model.modules():
        if isinstance(module, OptimizerStepHook):
            module.after_optimizer_step()
    values = torch.stack([t.detach() for t in terms.values()])
    if dp_group is not None:  # each data-parallel rank's loss is over its part of the batch
        dist.all_reduce(values, group=dp_group)
        values /= dist.get_world_size(dp_group)
    return dict(zip(terms, values.tolist())), norm.item()


for case in json.loads(sys.argv[1]):
    extra = ["model.layers[*].attention.dropout=0.0"] if case["model"] == "llama" else []
    extra += ["model.tie_embeddings=True"] if case["tied"] else []
    config, _ = resolve(RECIPES[case["model"]], ["debug", "precision=@fp32", *extra])
    dp, tp = case["dp"], dist.get_world_size() // case["dp"]
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    reference, parallel = build(config, None, case), build(config, mesh, case)
    start = {name: param.detach().clone() for name, param in reference.named_parameters()}
    initial_diff = max((full(p) - start[n]).abs().max().item() for n, p in parallel.named_parameters())
    generator = torch.Generator().manual_seed(1)
    dp_rank = mesh["dp"].get_local_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, eps=1e-5) for m in (reference, parallel)]
    losses = {"reference": [], "parallel": []}
    for _ in range(STEPS):
        tokens = torch.randint(0, config.model.vocab_size, (BATCH, SEQ + 1), generator=generator)
        # packed documents: a boundary at a random position in each row
        doc_ids = (torch.arange(SEQ)[None] >= torch.randint(1, SEQ, (BATCH, 1), generator=generator)).long()
        losses["reference"].append(step(reference, optimizers[0], tokens, doc_ids, None))
        losses["parallel"].append(step(parallel, optimizers[1], tokens[rows], doc_ids[rows],
                                       mesh["dp"].get_group() if dp > 1 else None))
    with torch.no_grad():  # evaluation: the forward alone, then the loss outside any training step
        logits = parallel(tokens[rows, :-1])
        evaluated = [cross_entropy(logits, tokens[rows, 1:]).item(),
                     cross_entropy(reference(tokens[rows, :-1]), tokens[rows, 1:]).item()]
    diffs = {n: (full(p) - r).abs().max().item() for (n, r), (_, p) in
             zip(reference.named_parameters(), parallel.named_parameters())}
    moved = {n: (r - start[n]).abs().max().item() for n, r in reference.named_parameters()}
    if dist.get_rank() == 0:
        shown = dict(type=type(logits).__name__, placements=[str(p) for p in getattr(logits, "placements", [])],
                     local_shape=list(getattr(logits, "_local_tensor", logits).shape))
        print("CASE", json.dumps(dict(case=case, losses=losses, initial_diff=initial_diff, param_diff=diffs,
                                      moved=moved, logits=shown, evaluated=evaluated, tied=parallel.tied,
                                      vocab=config.model.vocab_size)), flush=True)
    dist.barrier()
'''

TWO = [dict(model="llama", sp=True, loss_parallel=True, dp=1, tied=False),
       dict(model="llama", sp=False, loss_parallel=False, dp=1, tied=True),  # the head shares the embedding
       dict(model="deepseek", sp=True, loss_parallel=True, dp=1, tied=False)]
FOUR = [dict(model="llama", sp=True, loss_parallel=True, dp=2, tied=False),   # FSDP over dp=2 x TP over tp=2
        dict(model="deepseek", sp=True, loss_parallel=True, dp=2, tied=False)]


def launch(tmp_path_factory, processes: int, cases: list[dict]) -> list[dict]:
    script = tmp_path_factory.mktemp(f"tp{processes}") / "run.py"
    script.write_text(RUN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), str(script), json.dumps(cases)], text=True, capture_output=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line[len("CASE"):]) for line in done.stdout.splitlines() if line.startswith("CASE")]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory, 2, TWO)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch(tmp_path_factory, 4, FOUR)


def check_equals_one_process(result: dict, tp: int) -> None:
    assert result["tied"] == result["case"]["tied"]
    assert result["initial_diff"] == 0.0  # sharded init draws the single-process weights
    reference, parallel = result["losses"]["reference"], result["losses"]["parallel"]
    assert len(parallel) == 3
    for (ref_terms, ref_norm), (terms, norm) in zip(reference, parallel):
        assert terms.keys() == ref_terms.keys()
        for name, value in ref_terms.items():
            assert terms[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        # the global gradient norm over all shards (it drifts most: ~1e-5 relative by step 3)
        assert norm == pytest.approx(ref_norm, rel=5e-5)
    # the weights moved by ~1e-2 in 3 steps; the parallel ones end within 1e-5 of one process's
    assert max(result["moved"].values()) > 5e-3
    assert result["param_diff"].keys() == result["moved"].keys()
    worst = max(result["param_diff"].items(), key=lambda item: item[1])
    assert worst[1] < 1e-5, worst
    assert result["evaluated"][0] == pytest.approx(result["evaluated"][1], rel=1e-5)
    logits = result["logits"]
    if result["case"]["loss_parallel"]:  # the head's logits stay sharded over the vocabulary
        assert logits["type"] == "DTensor" and logits["placements"] == ["S(2)"]  # Shard(2): vocab
        assert logits["local_shape"][-1] == result["vocab"] // tp
    else:
        assert logits["type"] == "Tensor" and logits["local_shape"][-1] == result["vocab"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(TWO)), ids=[f"{c['model']}-sp{int(c['sp'])}" for c in TWO])
def test_tp2_equals_one_process(two, index):
    result = two[index]
    assert result["case"] == TWO[index]
    check_equals_one_process(result, tp=2)
    if result["case"]["model"] == "deepseek":
        assert set(result["losses"]["parallel"][0][0]) == {"lm", "mtp", "balance"}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(FOUR)), ids=[c["model"] for c in FOUR])
def test_fsdp_x_tp_equals_one_process(four, index):
    result = four[index]
    assert result["case"] == FOUR[index]
    check_equals_one_process(result, tp=2)


def config(recipe):
    return resolve(recipe, ["debug"])[0].model


def test_faults_name_heads_that_tp_does_not_divide():
    llama = config(llama_pretrain.recipe)  # 6 query heads, 2 key/value heads, 6 layers
    assert tensor_parallel_faults(llama, 2) == [] and tensor_parallel_faults(llama, 1) == []
    four = tensor_parallel_faults(llama, 4)
    assert "model.layers[0].attention.n_heads=6 is not divisible by tp=4" in four[0]
    assert "model.layers[5].attention.n_kv_heads=2 is not divisible by tp=4" in four[-1]
    assert len(four) == 12
    three = tensor_parallel_faults(llama, 3)  # divides the query heads, not the key/value heads
    assert not any(".n_heads=" in fault for fault in three)
    assert sum("attention.n_kv_heads=2 is not divisible by tp=3" in fault for fault in three) == 6
    assert any("vocab_size=2048" in fault for fault in three)
    assert any("feed_forward.hidden_dim=512" in fault for fault in three)
    assert tensor_parallel_faults(build_model_on_meta(llama), 4) == four  # a built model: the same faults


def test_faults_cover_mla_and_the_mtp_block():
    deepseek = config(deepseek_pretrain.recipe)  # MLA with 4 heads in 4 layers and the MTP block
    assert tensor_parallel_faults(deepseek, 2) == []
    eight = tensor_parallel_faults(deepseek, 8)
    assert [fault.split(" ")[0] for fault in eight] == [
        *(f"model.layers[{i}].attention.n_heads=4" for i in range(4)), "model.mtp[0].block.attention.n_heads=4"]
    assert tensor_parallel_faults(deepseek, 0) == ["tp=0: use a degree >= 1"]


def test_apply_refuses_before_touching_the_model():
    model = build_model_on_meta(config(llama_pretrain.recipe))
    with pytest.raises(TensorParallelError, match=r"(?s)tp=4\) cannot split.*n_kv_heads=2 is not divisible"):
        apply_tensor_parallel(model, types.SimpleNamespace(size=lambda: 4))
    assert model.layers[0].attention.n_heads == 6
