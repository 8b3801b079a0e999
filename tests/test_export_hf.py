"""`--export-hf DIR`: a trained model written as a transformers checkpoint gives transformers'
logits identical to ours (fp32), for the Llama and DeepSeek recipes; models no layout can
express are refused before training."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.components.families.gpt2.builder import gpt2
from tessera.components.families.llama.builder import llama
from tessera.components.families.llama.hf import save_pretrained
from tessera.components.train.checkpoint import load_model
from tessera.components.train.export import export_faults
from tessera.components.train.launch import build_model_on_meta

from helpers.launch import run_recipe

transformers = pytest.importorskip("transformers")

TINY = ("precision=@fp32", "steps=3", "batch_size=2", "seq_len=32", "metrics.tensorboard=False",
        "metrics.plots=False", "checkpoint.every=3")


def same_logits(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int) -> None:
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe,architecture", [("llama_pretrain", "LlamaForCausalLM"),
                                                 ("deepseek_pretrain", "DeepseekV3ForCausalLM")])
def test_trained_model_exports_and_loads_in_transformers_with_identical_logits(tmp_path, recipe, architecture):
    result = run_recipe(*TINY, f"metrics.folder={tmp_path}/run", f"checkpoint.folder={tmp_path}/ck",
                        "--export-hf", str(tmp_path / "hf"), recipe=recipe, timeout=240,
                        fresh=recipe == "deepseek_pretrain")  # one flagship run ends as `python` ends it
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported the model as {architecture} to {tmp_path / 'hf'}" in result.stdout
    theirs = getattr(transformers, architecture).from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "ck" / "step-00000003").eval()
    assert not torch.equal(ours.layers[0].attention_norm.weight, torch.ones_like(ours.layers[0].attention_norm.weight))
    same_logits(ours, theirs, vocab=ours.vocab_size)


@pytest.mark.slow
def test_resumed_finished_run_exports_without_training_again(tmp_path):
    folders = (f"metrics.folder={tmp_path}/run", f"checkpoint.folder={tmp_path}/ck")
    assert run_recipe(*TINY, *folders).returncode == 0
    result = run_recipe(*TINY, *folders, "--resume", "--export-hf", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "step     1" not in result.stdout
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    same_logits(load_model(tmp_path / "ck" / "step-00000003").eval(), theirs, vocab=2048)


def test_a_model_no_layout_expresses_is_refused_before_training(tmp_path):
    result = run_recipe(*TINY, "model.layers[*].attention.position=@alibi", f"metrics.folder={tmp_path}/run",
                        f"checkpoint.folder={tmp_path}/ck", "--export-hf", str(tmp_path / "hf"))
    assert result.returncode == 2
    error = " ".join(result.stderr.split())
    assert "model.layers[0].attention.position: the LlamaForCausalLM checkpoint layout cannot express it" in error
    assert "ALiBi" in error and "Traceback" not in result.stderr
    assert "step" not in result.stdout and not (tmp_path / "hf").exists()


def test_gpt2_learned_positions_are_refused_by_name():
    faults = export_faults(build_model_on_meta(gpt2(vocab_size=97, dim=64, n_layers=2, n_heads=4, max_len=32)))
    paths = {fault.path for fault in faults}
    assert {"model.position", "model.norm", "model.layers[0].feed_forward"} <= paths


def test_interleaved_rope_and_tied_head_export_to_half_split_llama(tmp_path):
    config = llama(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, tie_embeddings=True)
    for layer in config.layers:
        layer.attention.position.interleaved = True
    torch.manual_seed(0)
    ours = fdl.build(config).eval()
    ours.init_weights()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm weight shows
        for name, param in ours.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    save_pretrained(ours, tmp_path / "hf", max_position_embeddings=64)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.tie_word_embeddings
    same_logits(ours, theirs, vocab=101)
