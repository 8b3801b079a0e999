"""Parallel plans a model cannot take fail before training, naming the constraint (issue 13).

`Mesh.apply` checks the degrees against the launch (WORLD_SIZE) and the model against each
model-parallel degree before it creates any process group, so each case here sets WORLD_SIZE
to the degrees' product, applies the plan to a model on the meta device in this one process,
and checks the MeshError names the config path, the constraint and a fix, and that no
process group was started. One test runs a bad plan from the command line under torchrun,
as a user would, and checks what that user reads.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable

import fiddle as fdl
import pytest
import torch
import torch.distributed as dist
from torch import nn

from tessera.cli import resolve
from tessera.components.moe.moe import MoE
from tessera.components.parallel.mesh import Mesh, MeshError
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain

from helpers.launch import ROOT, child_cpu_seconds, own_traceback_frames, recipe_script, run_recipe, torchrun

LLAMA, DEEPSEEK = llama_pretrain.recipe, deepseek_pretrain.recipe  # debug: 6 layers / 4 layers + 1 MTP block


def meta_model(recipe, *args: str, edit: Callable[[fdl.Config], None] | None = None) -> nn.Module:
    """The preset's model (args: preset then overrides), validated, optionally edited, on meta."""
    config = resolve(recipe, list(args))[0].model
    if edit is not None:
        edit(config)
    return build_model_on_meta(config)


def refusal(monkeypatch, plan: Mesh, model: nn.Module, world_size: int) -> str:
    """The message `plan` refuses `model` with on `world_size` processes; no group may start."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    grouped = dist.is_initialized()  # another in-process test may have left one up
    with pytest.raises(MeshError) as err:
        plan.apply(model)
    assert dist.is_initialized() == grouped, "the plan started a process group before refusing"
    return " ".join(str(err.value).split())  # rich-free, one line: phrases may not break


def regroup_experts(n_experts: int, n_groups: int) -> Callable[[fdl.Config], None]:
    """Give every MoE layer (main and MTP) `n_experts` routed experts in `n_groups` groups."""

    def edit(model: fdl.Config) -> None:
        blocks = [*model.layers, *(m.block for m in model.mtp)]
        for ffn in (b.feed_forward for b in blocks):
            if issubclass(ffn.__fn_or_cls__, MoE):
                ffn.router.n_experts = ffn.experts.n_experts = n_experts
                ffn.router.n_groups = n_groups

    return edit


# -- tensor parallelism ------------------------------------------------------------------------------
def test_tp_not_dividing_the_attention_heads(monkeypatch):
    text = refusal(monkeypatch, Mesh(tp=8), meta_model(DEEPSEEK, "debug"), 8)  # MLA: 4 heads
    for path in [*(f"model.layers[{i}]" for i in range(4)), "model.mtp[0].block"]:
        assert f"{path}.attention.n_heads=4 is not divisible by tp=8" in text
    assert "divisors: [1, 2, 4]" in text


def test_tp_not_dividing_the_key_value_heads_of_gqa(monkeypatch):
    model = meta_model(LLAMA, "debug", "model.layers[*].attention.n_kv_heads=1")  # 6 query heads, 1 kv head
    text = refusal(monkeypatch, Mesh(tp=2), model, 2)
    assert "model.layers[5].attention.n_kv_heads=1 is not divisible by tp=2" in text
    assert "n_kv_heads / tp heads" in text
    assert ".n_heads=" not in text  # tp=2 divides the 6 query heads: only the kv heads are named


def test_tp_not_dividing_the_vocabulary_or_the_mlp_width(monkeypatch):
    model = meta_model(LLAMA, "debug", "model.vocab_size=2049", "model.layers[3].feed_forward.hidden_dim=511")
    text = refusal(monkeypatch, Mesh(tp=2), model, 2)
    assert "model.vocab_size=2049 is not divisible by tp=2" in text and "pad the vocabulary" in text
    assert "model.layers[3].feed_forward.hidden_dim=511 is not divisible by tp=2" in text
    assert "layers[2].feed_forward" not in text  # only the layer that breaks it


def test_tp_on_blocks_without_a_tensor_parallel_plan(monkeypatch, temporary_entries):
    text = refusal(monkeypatch, Mesh(tp=2), meta_model(LLAMA, "hybrid_debug"), 2)  # linear attention in 0, 1, 3, 4
    assert "model.layers[0].attention is a LinearAttention, which has no tensor-parallel plan" in text
    assert "layers[2].attention" not in text  # its softmax attention splits

    # the example plugin's attention (examples/custom_plugin), loaded from its source as a user's would be
    spec = importlib.util.spec_from_file_location(
        "cosine_attention_for_plans", ROOT / "examples" / "custom_plugin" / "tessera_cosine_attention" / "attention.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    cosine = meta_model(LLAMA, "debug", "model.layers[*].attention=@cosine_attention")
    text = refusal(monkeypatch, Mesh(tp=2), cosine, 2)
    assert "model.layers[5].attention is a CosineAttention, which has no tensor-parallel plan" in text
    assert "or tp=1" in text


# -- pipeline parallelism ----------------------------------------------------------------------------
@pytest.mark.parametrize("plan, words", [
    (Mesh(pp=8), ["8 x 1 = 8 pipeline stages but the model has 6 layers", "stages <= layers", "use pp <= 6"]),
    (Mesh(pp=4, schedule="Interleaved1F1B", virtual_stages=2),
     ["4 x 2 = 8 pipeline stages", "virtual_stages=2 on each rank", "use pp <= 3 or fewer virtual_stages"]),
    (Mesh(pp=4, schedule="DualPipeV"), ["4 x 2 = 8 pipeline stages", "DualPipeV's V puts 2 stages on each rank",
                                        "use pp <= 3"]),
], ids=["1F1B", "Interleaved1F1B", "DualPipeV"])
def test_pp_with_more_stages_than_layers(monkeypatch, plan, words):
    text = refusal(monkeypatch, plan, meta_model(LLAMA, "debug"), plan.pp)
    for word in words:
        assert word in text
    assert "model.layers" in text


def test_pp_with_tied_embeddings(monkeypatch):
    text = refusal(monkeypatch, Mesh(pp=2), meta_model(LLAMA, "debug", "model.tie_embeddings=True"), 2)
    assert "tie_embeddings=True" in text and "set model.tie_embeddings=False" in text


# -- expert parallelism ------------------------------------------------------------------------------
def test_ep_not_dividing_the_routed_experts(monkeypatch):
    text = refusal(monkeypatch, Mesh(dp_shard=3, ep=3), meta_model(DEEPSEEK, "debug"), 3)  # 8 experts
    for path in ("model.layers[1].feed_forward", "model.layers[3].feed_forward", "model.mtp[0].block.feed_forward"):
        assert f"{path}: ep=3 does not divide its 8 routed experts" in text
    assert "divisors of 8: [1, 2, 4, 8]" in text
    assert "layers[0].feed_forward" not in text  # the dense first layer has no experts


def test_group_limited_routing_misaligned_with_ep(monkeypatch):
    model = meta_model(DEEPSEEK, "debug", edit=regroup_experts(12, 4))  # 4 groups of 3; ep=6 divides 12 experts
    text = refusal(monkeypatch, Mesh(dp_shard=6, ep=6), model, 6)
    assert "model.layers[2].feed_forward: group-limited routing's 4 groups (router.n_groups) do not align with " \
           "ep=6" in text
    assert "(here: [1, 2, 4, 12])" in text
    assert "does not divide" not in text  # the expert count is fine: only the groups straddle processes


def test_ep_on_a_model_without_experts(monkeypatch):
    text = refusal(monkeypatch, Mesh(dp_shard=2, ep=2), meta_model(LLAMA, "debug"), 2)
    assert "ep=2 but the model has no MoE layer" in text and "use ep=1" in text


# -- a model that is not a DecoderLM -----------------------------------------------------------------
def third_party_model() -> nn.Module:
    """examples/third_party_model.py's TinyGPT: tessera's MLA and MoE in a model of its own."""
    spec = importlib.util.spec_from_file_location("third_party_model_for_plans",
                                                  ROOT / "examples" / "third_party_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with torch.device("meta"):
        return example.TinyGPT()


@pytest.mark.parametrize("plan", [Mesh(pp=2), Mesh(tp=2)], ids=["pp", "tp"])
def test_model_parallelism_of_a_model_that_is_not_a_decoder(monkeypatch, plan):
    text = refusal(monkeypatch, plan, third_party_model(), 2)
    assert "model is a TinyGPT, not a DecoderLM" in text
    assert f"or use {'pp' if plan.pp > 1 else 'tp'}=1" in text


def test_ep_names_the_moe_layers_of_any_model(monkeypatch):
    text = refusal(monkeypatch, Mesh(dp_shard=3, ep=3), third_party_model(), 3)  # 8 experts per MoE
    assert "model.blocks[0].mlp: ep=3 does not divide its 8 routed experts" in text


# -- from the command line ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_bad_plan_from_torchrun_exits_before_training_with_the_message():
    """2 processes, tp=2 against a single key/value head: each process says why and exits 2
    before any step; torchrun reports the failure (its own summary is torchrun's)."""
    with child_cpu_seconds() as cpu:  # CPU time, not wall time: other work on the machine does not count
        result = torchrun(recipe_script("llama_pretrain"), "debug", "parallel=@mesh(tp=2)",
                          "model.layers[*].attention.n_kv_heads=1", timeout=180)
    elapsed = cpu[0]
    err = " ".join(result.stderr.split())
    assert result.returncode != 0, result.stderr
    assert "error: parallel=@mesh: model.layers[0].attention.n_kv_heads=1 is not divisible by tp=2" in err, err
    assert "use a tp that divides n_kv_heads" in err
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr), result.stderr  # the config-fault status, not a crash
    # no traceback from the run itself (torchrun prints its own ChildFailedError summary, from its own
    # files: the Python environment's, which may live inside the checkout)
    assert own_traceback_frames(result.stderr) == [] and "MeshError" not in result.stderr, result.stderr
    assert "step" not in result.stdout, result.stdout  # nothing trained
    assert elapsed < 60, f"refusing the plan took {elapsed:.0f} s of CPU"  # imports, no training


def test_dry_run_finds_the_plan_the_model_cannot_take():
    """`--dry-run` checks the plan against the model on the meta device, as the run would
    before training: a tp that does not divide the heads is refused on a laptop (exit 2)."""
    result = run_recipe("--dry-run", "debug", "parallel=@mesh(tp=4)")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "n_heads=6 is not divisible by tp=4" in result.stderr and "divisors: [1, 2, 3, 6]" in result.stderr
    assert "Traceback" not in result.stderr and "memory: peak" not in result.stdout
    assert run_recipe("--dry-run", "debug", "parallel=@mesh(tp=2)").returncode == 0


def test_too_few_micro_batches_for_the_schedule_name_the_settings():
    """The trainer's micro-batch count is known at the first step; the plan refuses it there,
    naming the settings that change it."""
    from tessera.components.parallel.pipeline import microbatch_faults

    (fault,) = microbatch_faults("1F1B", 2, 1, 1)
    assert "1F1B needs at least 2 micro-batches per step on pp=2, got 1" in fault
    assert "parallel.n_microbatches" in fault and "micro_batch_size" in fault
    (fault,) = microbatch_faults("DualPipeV", 2, 1, 3)
    assert "at least 4 micro-batches" in fault  # the V: 2 x pp stages
    assert microbatch_faults("GPipe", 4, 1, 1) == [] and microbatch_faults("1F1B", 2, 1, 2) == []
