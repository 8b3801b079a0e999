"""Third-party plugins through the `tessera.components` entry-point group, with real distributions."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers.launch import ROOT
from helpers.plugins import make_distribution, run_python


def test_plugin_registers_lazily_and_broken_plugin_only_warns(tmp_path):
    make_distribution(tmp_path, "good-norms", "good_norms", """
        import torch
        from tessera.components.interfaces import Norm
        from tessera.registry import NORM

        @NORM.register("scale_norm")
        class ScaleNorm(Norm):
            def __init__(self, *, dim: int):
                super().__init__()
                self.dim = dim
                self.g = torch.nn.Parameter(torch.ones(()))

            def forward(self, x):
                return self.g * x / x.norm(dim=-1, keepdim=True)
    """)
    make_distribution(tmp_path, "broken-blocks", "broken_blocks", "raise RuntimeError('boom at import')\n")
    result = run_python("""
        import sys, warnings
        from tessera.registry import NORM
        assert "good_norms" not in sys.modules, "plugins must load lazily"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = NORM.names()
        assert "scale_norm" in names, names
        messages = [str(w.message) for w in caught]
        assert any("broken-blocks" in m and "boom at import" in m for m in messages), messages
        print("OK", names)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_plugin_component_is_swappable_and_loadable_from_json(tmp_path):
    make_distribution(tmp_path, "good-norms", "good_norms", """
        import torch
        from tessera.components.interfaces import Norm
        from tessera.registry import NORM

        @NORM.register("scale_norm")
        class ScaleNorm(Norm):
            def __init__(self, *, dim: int, eps: float = 1e-6):
                super().__init__()
                self.dim = dim

            def forward(self, x):
                return x
    """)
    dump = tmp_path / "cfg.json"
    recipe = str(ROOT / "recipes" / "llama_pretrain.py")
    result = run_python(f"""
        import sys
        sys.argv = [{recipe!r}, "model.norm=@scale_norm", "--dump", {str(dump)!r}]
        from tessera.recipes.llama_pretrain import recipe
        recipe.main()
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"good_norms"' in dump.read_text()
    result = run_python(f"""
        import sys
        sys.argv = [{recipe!r}, "--load", {str(dump)!r}, "--help"]
        from tessera.recipes.llama_pretrain import recipe
        from tessera.registry import serialize
        cfg = serialize.load({str(dump)!r})
        assert type(cfg.model.norm).__name__ == "Config" and cfg.model.norm.__fn_or_cls__.__name__ == "ScaleNorm"
        recipe.main()
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scale_norm" in result.stdout


# --- the example plugin's attention (examples/custom_plugin) against a naive reference ------

PLUGIN_DIR = ROOT / "examples" / "custom_plugin"


@pytest.fixture
def cosine_attention(temporary_entries):
    """The example plugin's `CosineAttention` class, loaded from its source file (its ATTENTION
    entry is removed after the test)."""
    spec = importlib.util.spec_from_file_location(
        "cosine_attention_under_test", PLUGIN_DIR / "tessera_cosine_attention" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CosineAttention


def naive_cosine_attention(attn, x, *, position, doc_ids=None):
    """Loop-per-head reference: cosine scores times each head's scale, a causal (and same-document)
    mask, softmax, weighted values; RoPE (half-split) and ALiBi written out here."""
    b, t, _ = x.shape
    h, hkv, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(b, t, h, dh)
    k = (x @ attn.wk.weight.T).view(b, t, hkv, dh)
    v = (x @ attn.wv.weight.T).view(b, t, hkv, dh)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    pos = torch.arange(t, dtype=torch.float64)
    if position == "rope":
        freq = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
        cos, sin = (pos[:, None] * freq).cos()[None, :, None], (pos[:, None] * freq).sin()[None, :, None]

        def rotate(z):
            a, c = z[..., : dh // 2], z[..., dh // 2:]
            return torch.cat([a * cos - c * sin, a * sin + c * cos], dim=-1)

        q, k = rotate(q), rotate(k)
    out = torch.zeros(b, t, h, dh, dtype=x.dtype)
    for head in range(h):
        kv = head // (h // hkv)  # consecutive query heads share a kv head
        scores = attn.scale[head] * torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv])
        if position == "alibi":
            slope = 2.0 ** (-8.0 * (head + 1) / h)
            scores = scores - slope * (pos[:, None] - pos[None, :])
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[:, :, head] = weights @ v[:, :, kv]
    return out.reshape(b, t, h * dh) @ attn.wo.weight.T


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_plugin_cosine_attention_matches_naive_reference(cosine_attention, position):
    from tessera.components.position.alibi import ALiBi
    from tessera.components.position.rope import RoPE

    torch.manual_seed(0)
    encoding = {"rope": RoPE(), "alibi": ALiBi(), "none": None}[position]
    attn = cosine_attention(dim=32, n_heads=4, n_kv_heads=2, position=encoding, init_scale=6.0).double()
    with torch.no_grad():  # distinct scales per head, so a head mix-up shows
        attn.scale.copy_(torch.tensor([3.0, 6.0, 9.0, 12.0]))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    for docs in (None, doc_ids):
        torch.testing.assert_close(attn(x, doc_ids=docs), naive_cosine_attention(attn, x, position=position,
                                                                                doc_ids=docs))


def test_plugin_cosine_attention_is_usable_as_built_and_learns_its_scale(cosine_attention):
    attn = cosine_attention(dim=24, n_heads=3, init_scale=5.0)
    assert attn.head_dim == 8 and attn.n_kv_heads == 3
    assert torch.equal(attn.scale, torch.full((3,), 5.0))
    assert 0.01 < attn.wq.weight.std().item() < 0.03  # initialised in the constructor (std 0.02)
    attn(torch.randn(2, 5, 24)).square().sum().backward()
    assert attn.scale.grad is not None and attn.scale.grad.abs().sum() > 0
    attn.reset_parameters(init_std=0.5, out_std=0.1)
    assert attn.wq.weight.std().item() > 0.3 and attn.wo.weight.std().item() < 0.2
    # score FLOPs as for softmax attention of the same heads: q k^T and the weighted sum
    assert attn.score_flops_per_token(100) == 2 * 2 * 3 * 8 * 100


class _FakeEntry:
    """An entry point of the `tessera.components` group from distribution `dist`."""

    def __init__(self, name: str, dist: str, load):
        self.name, self.value, self.load = name, f"{name}_module", load
        self.dist = type("Dist", (), {"name": dist})()


def test_tessera_own_entry_loads_first_and_its_failure_raises(monkeypatch):
    import importlib.metadata

    from tessera.registry import plugins

    order = []
    third_party = _FakeEntry("third", "some-plugin", lambda: order.append("third"))
    own = _FakeEntry("tessera", "tessera", lambda: order.append("own"))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [third_party, own])
    assert plugins.load_plugins() == ["tessera", "third"] and order == ["own", "third"]

    def broken():
        raise ImportError("a built-in module is broken")

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [_FakeEntry("tessera", "tessera", broken)])
    with pytest.raises(ImportError, match="built-in module is broken"):
        plugins.load_plugins()
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [_FakeEntry("third", "some-plugin", broken)])
    with pytest.warns(plugins.PluginWarning, match="some-plugin"):
        assert plugins.load_plugins() == []


def test_registries_without_tessera_own_entry_point_say_how_to_install(monkeypatch):
    """The folders on PYTHONPATH without an install register no built-in: a message, not "unknown name"."""
    import importlib.metadata

    from tessera.registry import RegistryError
    from tessera.registry import registry as registry_module

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(registry_module, "_loaded", False)
    with pytest.raises(RegistryError, match="pip install -e ."):
        registry_module._ensure_loaded()
    assert registry_module._loaded is False  # asked again on the next lookup
