"""Continued pretraining from a transformers checkpoint on the command line (`--from-hf`): a
tiny Llama written by transformers, with a tokenizer.json trained here, continues training on
a small corpus; its first step's loss is transformers' loss on the run's first batch, the
exported folder loads in transformers with the trained model's logits and its tokenizer, and
under FSDP, tensor and pipeline parallelism every process reads only its shard (2 processes, gloo)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fiddle as fdl
import pytest
import torch
import torch.nn.functional as F

from tessera.cli import resolve
from tessera.cli.run import run_cli
from tessera.components.data.hf_tokenizer import hf_encoding
from tessera.components.train.checkpoint import load_model
from tessera.recipes.llama_pretrain import recipe

from helpers.forked_ranks import run_ranks
from helpers.launch import run_recipe, worker

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("river stone light cloud paper garden window music 2026 3.14 café naïve 東京 north south quickly "
         "def return for while print(x) {key: value} 1234567 the a of and to in is that").split()
SEQ, BATCH = 48, 2


def corpus(folder, n: int = 80) -> list[str]:
    """n documents of random word salad (distinct, so dedup keeps them), one txt file each."""
    rng = random.Random(0)
    folder.mkdir()
    texts = []
    for i in range(n):
        text = f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "\n"
        (folder / f"{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


def checkpoint(folder, texts: list[str]) -> None:
    """A Llama-3-style byte-level BPE trained on `texts` and a tiny LlamaForCausalLM of its vocabulary."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}|[^\r\n\p{L}\p{N}]?\p{L}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+(?!\S)|\s+"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size() + 3, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, eos_token_id=tok.token_to_id("<|end_of_text|>"),
                                      bos_token_id=0, initializer_range=0.3)  # far from uniform predictions
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue_hf")
    checkpoint(root / "ckpt", corpus(root / "corpus"))
    return root


def run_args(root) -> list[str]:
    return ["continue_hf", f"data.path={root / 'corpus'}", f"data.data_dir={root / 'data'}", "data.val_fraction=0.2",
            "steps=3", f"batch_size={BATCH}", f"seq_len={SEQ}", "scheduler.warmup_steps=1", "scheduler.total_steps=3",
            f"metrics.folder={root / 'run'}", "metrics.tensorboard=False", "metrics.plots=False",
            f"checkpoint.folder={root / 'ck'}", "checkpoint.every=3", "validation.batches=1"]


def hf_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' mean next-token loss on our packed batch: each document of a row run on its
    own (our attention stays within a document; RoPE scores depend only on relative positions)."""
    logits = []
    for row, docs in zip(batch["tokens"], batch["doc_ids"], strict=True):
        pieces = [model(row[docs == d][None]).logits[0] for d in docs.unique(sorted=True)]
        logits.append(torch.cat(pieces))
    logits = torch.stack(logits)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())


@pytest.mark.slow
def test_continued_run_starts_at_transformers_loss_and_exports(released):
    ckpt, out = released / "ckpt", released / "hf"
    result = run_recipe(*run_args(released), "--from-hf", str(ckpt), "--export-hf", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"init: weights from {ckpt}" in result.stdout and "tokenized with" in result.stderr

    # The run's first batch, from its own (cached) data pipeline.
    config, _ = resolve(recipe, run_args(released)[:4], from_hf=str(ckpt))  # the preset and data settings
    data = fdl.build(config.data)
    data.progress = False
    batch = data.batch("train", batch_size=BATCH, seq_len=SEQ, generator=torch.Generator().manual_seed(config.seed))
    assert int(batch["tokens"].max()) < hf_encoding(ckpt).n_vocab
    assert int(batch["doc_ids"].max()) > 0  # documents packed together: the per-document attention counts
    theirs = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        expected = hf_loss(theirs, batch).item()
    steps = [json.loads(line) for line in (released / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5)

    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    trained = load_model(released / "ck" / "step-00000003").eval()
    tokens = batch["tokens"]
    with torch.no_grad():
        # two implementations of one function in fp32: their sums run in different orders, which
        # also differ between CPUs (1.4e-5 seen on an AVX2-only Zen 3); a wrong weight moves logits by >1e-2
        exported_logits = exported(tokens).logits
        torch.testing.assert_close(exported_logits, trained(tokens), rtol=1e-4, atol=5e-5)
        assert (exported_logits - theirs(tokens).logits).abs().max() > 1e-3  # it did train
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "river stone 1234567 café"
    assert tokenizer.encode(text, add_special_tokens=False) == hf_encoding(ckpt).encode_ordinary(text)


def deepseek_checkpoint(folder) -> None:
    """A tiny DeepSeek-V3 (MLA, 8 routed experts + 1 shared, aux-free bias) written by transformers."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=12, num_experts_per_tok=2, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        q_lora_rank=24, n_group=1, topk_group=1, rope_interleave=True)
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(folder)


def gpt2_checkpoint(folder) -> None:
    """A tiny GPT-2 (fused, transposed Conv1D projections) written by transformers."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                         bos_token_id=0, eos_token_id=0)).save_pretrained(folder)


def tp_llama_checkpoint(folder) -> None:
    """A tiny Llama with biases and an even vocabulary (tensor parallelism splits it)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def sharded(released, tmp_path_factory) -> dict[str, list[dict]]:
    """{"plan=folder": [rank 0's report, rank 1's]} of one 2-process run of the worker loading the
    released Llama, a DeepSeek-V3 and a GPT-2 under FSDP, and a biased Llama under TP and PP."""
    out = tmp_path_factory.mktemp("sharded")
    deepseek_checkpoint(out / "deepseek")
    gpt2_checkpoint(out / "gpt2")
    tp_llama_checkpoint(out / "llama")
    jobs = [f"fsdp={released / 'ckpt'}", f"fsdp={out / 'deepseek'}", f"fsdp={out / 'gpt2'}", f"tp={out / 'llama'}",
            f"pp={out / 'llama'}"]
    result = run_ranks(worker("hf_sharded_load"), str(out), *jobs, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    by_rank = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]
    return {job.split("=")[0] + ":" + Path(job.split("=", 1)[1]).name: [ranks[job] for ranks in by_rank]
            for job in jobs}


def check_sharded(reports: list[dict]) -> None:
    """Every parameter a DTensor holding exactly its shard; each rank read about half."""
    for report in reports:
        assert report["params"] and all(p["dtensor"] and p["equal"] for p in report["params"].values())
        assert report["read"] < 0.6 * report["total"]  # never a whole copy


@pytest.mark.slow
@pytest.mark.parametrize("job", ["fsdp:ckpt", "fsdp:deepseek", "fsdp:gpt2"])
def test_loading_under_fsdp_reads_each_rank_its_shard(sharded, job):
    reports = sharded[job]
    check_sharded(reports)
    sharded_params = [p for p in reports[0]["params"].values() if p["whole"][0] > 1]
    assert all(p["local"][0] < p["whole"][0] for p in sharded_params)
    if job == "fsdp:deepseek":
        assert reports[0]["params"]["layers.1.feed_forward.experts.w_gate"]["local"][0] == 4  # of 8 experts
    if job == "fsdp:ckpt":
        assert sum(r["read"] for r in reports) == reports[0]["total"]


@pytest.mark.slow
def test_loading_under_tensor_parallel_reads_each_rank_its_shard(sharded):
    reports = sharded["tp:llama"]
    check_sharded(reports)
    placements = {n: p["placements"] for n, p in reports[0]["params"].items()}
    assert placements["layers.0.attention.wo.weight"] == ["S(1)"]  # row-parallel: columns read
    assert placements["layers.0.attention.wq.bias"] == ["S(0)"]


@pytest.mark.slow
def test_loading_under_pipeline_parallel_reads_each_stage_its_layers(sharded):
    first, last = sharded["pp:llama"]
    for report in (first, last):
        assert all(p["equal"] for p in report["params"].values()) and report["read"] < 0.6 * report["total"]
    assert "embedding.weight" in first["params"] and "layers.0.attention.wq.weight" in first["params"]
    assert "head.weight" in last["params"] and "layers.1.attention.wq.weight" in last["params"]
    assert not set(first["params"]) & set(last["params"])
    assert first["read"] + last["read"] == first["total"]


def test_bad_checkpoints_are_config_faults_with_the_fix(released, tmp_path, capsys):
    def fails(folder) -> str:
        with pytest.raises(SystemExit) as exit_:
            run_cli(recipe, ["continue_hf", "--from-hf", str(folder), "--print"])
        error = " ".join(capsys.readouterr().err.split())
        assert exit_.value.code == 2 and "--from-hf" in error and "Traceback" not in error
        return error

    assert "no config.json" in fails(tmp_path)
    (tmp_path / "config.json").write_text((released / "ckpt" / "config.json").read_text())
    assert "no *.safetensors weights" in fails(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((released / "ckpt" / "model.safetensors").read_bytes())
    assert "no tokenizer.json" in fails(tmp_path)
    spec = json.loads((released / "ckpt" / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {"type": "NFC"}}))
    assert "NFC normalizer" in fails(tmp_path)
