"""The example scripts run and print what they should, and the example plugin works once pip-installed."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.launch import ROOT, run_recipe
from helpers.user_project import make_user_project, run_in


def run_example(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the example from a user's project that has its own `registry.py` and `components/`."""
    return run_in(make_user_project(tmp_path / "project"), ROOT / "examples" / script, timeout=180)


# `name: parameters N +D (+P%) | FLOPs/token N +D (+P%) | losses l1 l2 ...`
VARIANT_LINE = re.compile(r"^(?P<name>.+?): parameters (?P<params>[\d,]+) (?P<dparams>[+-][\d,]+) \([^)]*\) \| "
                          r"FLOPs/token (?P<flops>[\d,]+) (?P<dflops>[+-][\d,]+) \([^)]*\) \| losses (?P<losses>.+)$")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its runs sit under `if __name__ == "__main__"`
    return module


def test_swap_components_prints_each_swaps_cost_and_trains_it(tmp_path):
    result = run_example("swap_components.py", tmp_path)
    assert result.returncode == 0, result.stderr
    sections = result.stdout.split("== Llama")
    assert len(sections) == 2, result.stdout
    deepseek, llama = ({m["name"]: m for line in part.splitlines() if (m := VARIANT_LINE.match(line))}
                       for part in sections)
    assert list(deepseek) == ["base", "mla->gqa", "rope->alibi (on mla->gqa)", "moe->swiglu", "muon->lamb",
                              "cosine->wsd"], result.stdout
    assert list(llama) == ["base", "gqa->mqa"], result.stdout
    example = _load_example("swap_components")
    from tessera.recipes import deepseek_pretrain, llama_pretrain

    # Expected deltas, counted here from the preset's sizes (independent of tessera's stats).
    config = example.tiny(deepseek_pretrain.recipe.config("debug"))
    seq = config.seq_len
    blocks = list(example.blocks(config))
    mla = blocks[0].attention
    h, dim, rope = mla.n_heads, mla.dim, mla.qk_rope_head_dim
    nope, v, q_rank, kv_rank = mla.qk_nope_head_dim, mla.v_head_dim, mla.q_lora_rank, mla.kv_lora_rank
    mla_linear = (dim * q_rank + q_rank * h * (nope + rope) + dim * (kv_rank + rope) + kv_rank * h * (nope + v)
                  + h * v * dim)
    mla_params = mla_linear + q_rank + kv_rank  # + the two latent RMSNorm weights
    swapped = example.tiny(deepseek_pretrain.recipe.config("debug"))
    example.mla_to_gqa(swapped)
    kv_heads = swapped.model.layers[0].attention.n_kv_heads
    gqa_linear = 2 * dim * dim + 2 * dim * kv_heads * (dim // h)  # q, o full width; k, v for kv_heads
    gqa_score, mla_score = 4 * h * (dim // h) * seq, 2 * h * (nope + rope) * seq + 2 * h * v * seq
    n = len(blocks)
    assert _number(deepseek["mla->gqa"]["dparams"]) == n * (gqa_linear - mla_params)
    assert _number(deepseek["mla->gqa"]["dflops"]) == n * (6 * (gqa_linear - mla_linear) + 3 * (gqa_score - mla_score))
    # ALiBi, like RoPE, has no parameters and adds no matmuls: the same cost as the GQA variant
    for key in ("dparams", "dflops"):
        assert deepseek["rope->alibi (on mla->gqa)"][key] == deepseek["mla->gqa"][key]
    # MoE -> SwiGLU at equal activated FLOPs: the idle routed experts and the router go, FLOPs stay
    moes = [b.feed_forward for b in blocks if hasattr(b.feed_forward, "router")]
    e, k, hid = moes[0].router.n_experts, moes[0].router.top_k, moes[0].experts.hidden_dim
    assert _number(deepseek["moe->swiglu"]["dparams"]) == len(moes) * (3 * dim * hid * (k - e) - e * dim)
    assert abs(_number(deepseek["moe->swiglu"]["dflops"])) <= 0.01 * _number(deepseek["base"]["flops"])
    for name in ("muon->lamb", "cosine->wsd"):  # training-only swaps leave the model alone
        assert _number(deepseek[name]["dparams"]) == _number(deepseek[name]["dflops"]) == 0
    # Llama: multi-query keeps 1 of n_kv_heads key/value heads in every layer
    llama_config = llama_pretrain.recipe.config("debug")
    att = llama_config.model.layers[0].attention
    removed = len(llama_config.model.layers) * 2 * (att.n_kv_heads - 1) * (att.dim // att.n_heads) * att.dim
    assert _number(llama["gqa->mqa"]["dparams"]) == -removed
    assert _number(llama["gqa->mqa"]["dflops"]) == -6 * removed
    # Every variant trained: STEPS finite losses starting near ln(vocab), some later one lower
    for name, match in {**deepseek, **{f"llama {k}": m for k, m in llama.items()}}.items():
        losses = [float(x) for x in match["losses"].split()]
        assert len(losses) == example.STEPS and all(math.isfinite(x) for x in losses), (name, losses)
        assert abs(losses[0] - math.log(2048)) < 0.5 and min(losses[1:]) < losses[0], (name, losses)


def test_example_plugin_installed_with_pip_swaps_in_from_the_cli_and_trains(tmp_path):
    source = tmp_path / "custom_plugin"  # a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(ROOT / "examples" / "custom_plugin", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": str(target)}  # the plugin; tessera itself imports as installed
    listed = run_recipe("--help", env=env)
    assert listed.returncode == 0, listed.stderr
    attention_line = next(line for line in listed.stdout.splitlines() if line.strip().startswith("ATTENTION"))
    assert "cosine_attention" in attention_line and "gqa" in attention_line
    trained = run_recipe("model.layers[*].attention=@cosine_attention", "steps=5", "batch_size=4", "seq_len=64",
                         "precision=@fp32", "scheduler.warmup_steps=1", "scheduler.total_steps=5",
                         "progress.log_every=1", "metrics=None", "checkpoint=None", "compute.threads=1", env=env)
    assert trained.returncode == 0, trained.stderr
    assert "swapped to ATTENTION 'cosine_attention'" in trained.stderr
    losses = [float(x) for x in re.findall(r"^step\s+\d+\s+loss (\S+)", trained.stdout, flags=re.M)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), trained.stdout
    assert losses[-1] < losses[0], losses
