"""Block and model options, hybrid stacks, and the bad-input rules of the block library."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.attention.linear import LinearAttention
from tessera.components.mlp.gated import GatedMLP, GeGLU, ReGLU
from tessera.components.mlp.mlp import MLP
from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.components.norm.layernorm import LayerNorm
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.rope import RoPE
from tessera.components.train.launch import launch
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import ConfigError


def block(norm_position="pre", **kw) -> TransformerBlock:
    return TransformerBlock(attention=GroupedQueryAttention(dim=16, n_heads=2, position=RoPE()),
                            feed_forward=MLP(dim=16, hidden_dim=32), attention_norm=LayerNorm(dim=16),
                            ffn_norm=LayerNorm(dim=16), norm_position=norm_position, **kw)


def test_post_norm_block_formula():
    torch.manual_seed(0)
    b = block("post")
    x = torch.randn(2, 5, 16)
    h = b.attention_norm(x + b.attention(x))
    torch.testing.assert_close(b(x), b.ffn_norm(h + b.feed_forward(h)))


@pytest.mark.parametrize("mode", [True, "attention"])  # full block, or the attention sublayer only
def test_activation_checkpointing_gives_same_gradients(mode):
    torch.manual_seed(0)
    plain, ckpt = block(), block(checkpoint_activations=mode)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 16)
    for b in (plain, ckpt):
        b(x).pow(2).sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_residual_dropout_only_in_training():
    torch.manual_seed(0)
    b = block(residual_dropout=0.5)
    x = torch.randn(2, 5, 16)
    b.eval()
    reference = b(x)
    b.train()
    assert not torch.allclose(b(x), reference)


@pytest.mark.parametrize("cls,act", [(GeGLU, torch.nn.functional.gelu), (ReGLU, torch.relu)])
def test_gated_variants_and_mlp_activations(cls, act):
    torch.manual_seed(0)
    ffn = cls(dim=8, hidden_dim=12)
    x = torch.randn(3, 8)
    expected = (act(x @ ffn.w_gate.weight.T) * (x @ ffn.w_up.weight.T)) @ ffn.w_down.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)
    mlp = MLP(dim=8, hidden_dim=12, activation="relu", bias=False)
    torch.testing.assert_close(mlp(x), torch.relu(x @ mlp.w_up.weight.T) @ mlp.w_down.weight.T)
    assert isinstance(ffn, GatedMLP)


def test_init_std_and_depth_scaling():
    torch.manual_seed(0)
    layers = [TransformerBlock(attention=GroupedQueryAttention(dim=256, n_heads=4), feed_forward=MLP(dim=256,
              hidden_dim=512), attention_norm=RMSNorm(dim=256), ffn_norm=RMSNorm(dim=256)) for _ in range(8)]
    model = DecoderLM(vocab_size=1000, dim=256, layers=layers, norm=RMSNorm(dim=256), init_std=0.006)
    model.init_weights()
    assert model.embedding.weight.std().item() == pytest.approx(0.006, rel=0.05)
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.006, rel=0.05)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.006 / 4, rel=0.05)  # sqrt(2*8)
    assert model.layers[0].feed_forward.w_down.weight.std().item() == pytest.approx(0.006 / 4, rel=0.05)


def test_hybrid_preset_mixes_linear_and_softmax_and_trains():
    config, _ = resolve(recipe, ["hybrid_debug", "steps=2", "batch_size=2", "seq_len=64", "progress=None"])
    kinds = [fdl.get_callable(layer.attention) for layer in config.model.layers]
    assert kinds.count(LinearAttention) == 4 and kinds.count(GroupedQueryAttention) == 2
    result = launch(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("overrides,path,words", [
    (["model.layers[0].attention=@linear", "model.layers[0].attention.position=@alibi"],
     "model.layers[0].attention", "position kind in cls.supported_positions"),
    (["model.layers[1].attention.position=@learned(max_len=8, dim=32)"],
     "model.layers[1].attention", "supported_positions"),
    (["model.position=@rope"], "model", "position is absolute"),
    (["model.layers[2].attention.head_dim=33"], "model.layers[2].attention", "rotary head_dim is even"),
    (["model.layers[3].attention.n_kv_heads=4"], "model.layers[3].attention", "n_heads % n_kv_heads == 0"),
    (["model.layers[4].attention.n_heads=5"], "model.layers[4].attention", "dim % n_heads == 0"),
    (["model.layers[0].attention=@sliding_window(window=4096)"], "", "every attention window <= seq_len"),
    (["model.layers[0].attention=@block_sparse(block_size=48)"], "", "seq_len % block_size == 0"),
    (["model.layers[0].attention.q_norm=@rmsnorm(dim=32)"], "model.layers[0].attention", "q_norm and k_norm"),
])
def test_incompatible_combinations_fail_at_validation(overrides, path, words):
    with pytest.raises(ConfigError) as info:
        resolve(recipe, overrides)
    assert any(f.path == path and words in f.problem for f in info.value.faults), str(info.value)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_trainer_checkpointing_switch_leaves_the_run_unchanged(mode):
    from helpers.stdlib_bytes import StdlibBytes

    results = []
    for switch in ("none", mode):
        config, _ = resolve(recipe, ["debug", "steps=2", "batch_size=2", "seq_len=32", "precision=@fp32",
                                     "progress=None", "compute.threads=1",
                                     f"compute.activation_checkpointing={switch!r}"])
        config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
        results.append(launch(config))
    assert results[0].losses == results[1].losses
    assert all(layer.checkpoint_activations == (True if mode == "full" else "attention")
               for layer in results[1].model.layers)


def test_a_tied_head_stays_tied_when_the_model_leaves_the_meta_device():
    """Materialising a meta-device model gives each module's parameter new storage; the GPT-2
    head must still be the embedding afterwards (it trained untied before this was fixed)."""
    from tessera.components.families.gpt2.builder import gpt2
    from tessera.components.parallel.single import SingleProcess
    from tessera.components.train.launch import build_model_on_meta

    model = build_model_on_meta(gpt2(vocab_size=97, dim=32, n_layers=1, n_heads=2, max_len=16))
    assert model.tied
    SingleProcess().materialize(model, "cpu")
    assert model.tied and model.head.weight.device.type == "cpu"
    assert model.head.weight.data_ptr() == model.embedding.weight.data_ptr()
