"""Tensor + sequence parallelism: TP=2 (sequence-parallel or not, vocab-parallel loss or
gathered logits) and FSDP x TP on 2 x 2 processes train the llama and DeepSeek debug models
(MLA + MoE + MTP) exactly as one process does; models that tp cannot split are refused with
the constraint they break.

Each process count is launched once (forked ranks, gloo, 1 thread per rank,
tests/helpers/workers/tensor_parallel.py); every case trains the parallel model and, inside the
same processes, the single-process reference on the same batches, and rank 0 prints what the
tests compare."""

from __future__ import annotations

import json
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

from helpers.forked_ranks import run_ranks
from helpers.launch import worker

TWO = [dict(model="llama", sp=True, loss_parallel=True, dp=1, tied=False),
       dict(model="llama", sp=False, loss_parallel=False, dp=1, tied=True),  # the head shares the embedding
       dict(model="deepseek", sp=True, loss_parallel=True, dp=1, tied=False)]
FOUR = [dict(model="llama", sp=True, loss_parallel=True, dp=2, tied=False),   # FSDP over dp=2 x TP over tp=2
        dict(model="deepseek", sp=True, loss_parallel=True, dp=2, tied=False)]


def launch(processes: int, cases: list[dict]) -> list[dict]:
    done = run_ranks(worker("tensor_parallel"), json.dumps(cases), processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line[len("CASE"):]) for line in done.stdout.splitlines() if line.startswith("CASE")]


@pytest.fixture(scope="module")
def two():
    return launch(2, TWO)


@pytest.fixture(scope="module")
def four():
    return launch(4, FOUR)


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
