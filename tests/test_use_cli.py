"""`sample`, `perplexity` and `evaluate` from a recipe's command line, on a run's checkpoint and
on a transformers folder, against transformers' own generate and loss and a naive greedy loop."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.train.checkpoint import Checkpointer, load_model
from tessera.components.train.launch import launch
from tessera.recipes.deepseek_pretrain import recipe as deepseek_recipe
from tessera.recipes.llama_pretrain import recipe as llama_recipe

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Greedy decoding the slow, obvious way: the whole prefix through the model for each token."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A two-step flagship run's checkpoint folder (its tokenizer prepared in the shared data cache)."""
    folder = tmp_path_factory.mktemp("use") / "ck"
    config, _ = resolve(deepseek_recipe, ["steps=2", "batch_size=2", "seq_len=32", "precision=@fp32", "progress=None",
                                          "compute.threads=1"])
    config.checkpoint = fdl.Config(Checkpointer, folder=str(folder), every=2, keep=1)
    launch(config, export_hf=str(folder.parent / "hf"))
    return folder


def test_sample_prints_the_greedy_continuation_of_the_newest_checkpoint(run_checkpoint, capsys):
    from tessera.cli.trained import open_trained

    deepseek_recipe.main(["sample", "--checkpoint", str(run_checkpoint), "--prompt", "def main(",
                          "--max-new-tokens", "12"])
    printed = capsys.readouterr().out
    trained = open_trained(deepseek_recipe, str(run_checkpoint))
    model = load_model(run_checkpoint / "step-00000002").eval()  # independent of the command's loading
    encoding = trained.encoding
    ids = [encoding.eot_token] + encoding.encode_ordinary("def main(")
    expected = encoding.decode(greedy(model, ids, 12, encoding.eot_token))
    assert printed == "def main(" + expected + "\n"


def test_perplexity_of_a_file_is_the_models_loss_on_it(run_checkpoint, tmp_path, capsys):
    text = "import os\n\ndef walk(path):\n    return os.listdir(path)\n"
    (tmp_path / "t.py").write_text(text)
    deepseek_recipe.main(["perplexity", str(tmp_path / "t.py"), "--checkpoint", str(run_checkpoint)])
    printed = capsys.readouterr().out
    from tessera.cli.trained import open_trained

    encoding = open_trained(deepseek_recipe, str(run_checkpoint)).encoding
    ids = torch.tensor([[encoding.eot_token] + encoding.encode_ordinary(text)])
    model = load_model(run_checkpoint / "step-00000002").eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    assert f"loss {loss:.4f} nats/token" in printed
    assert f"{ids.shape[1] - 1:,} tokens, {len(text.encode()):,} bytes" in printed


def test_a_checkpoint_and_an_export_carry_the_runs_tokenizer(run_checkpoint, capsys):
    """Sampling needs no corpus: the checkpoint holds the tokenizer (listed in its manifest), and
    the transformers export holds it as tokenizer.json, read alike by transformers and by us."""
    import json

    from tessera.components.data.tokenizer import load_encoding

    step = run_checkpoint / "step-00000002"
    files = json.loads((step / "MANIFEST.json").read_text())["files"]
    assert {"tokenizer/tokenizer.tiktoken", "tokenizer/tokenizer.json"} <= set(files)
    data = fdl.build(resolve(deepseek_recipe, [])[0].data)
    ours = load_encoding(step / "tokenizer")
    assert ours._mergeable_ranks == data.encoding()._mergeable_ranks and ours.eot_token == data.encoding().eot_token
    exported = run_checkpoint.parent / "hf"
    text = "def walk(path):\n    return os.listdir(path)  # café"
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    assert auto(text, add_special_tokens=False)["input_ids"] == ours.encode_ordinary(text)
    args = ["--prompt", "import os", "--max-new-tokens", "8"]
    deepseek_recipe.main(["sample", "--checkpoint", str(step), *args])
    from_checkpoint = capsys.readouterr().out
    deepseek_recipe.main(["sample", "--checkpoint", str(exported), *args])
    assert capsys.readouterr().out == from_checkpoint


def test_evaluate_prints_the_harness_table_for_a_local_task(run_checkpoint, tmp_path, capsys):
    import json

    pytest.importorskip("lm_eval")
    from tessera.cli.trained import open_trained
    from tessera.components.evaluate.harness import evaluate_checkpoint

    rows = [{"context": "def main(", "choices": ["):", "zzzz"], "label": 0},
            {"context": "import", "choices": [" os", " 0.5!"], "label": 0},
            {"context": "return", "choices": [" x", " )))"], "label": 1}]
    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    deepseek_recipe.main(["evaluate", "--checkpoint", str(run_checkpoint), "--tasks", str(task)])
    printed = capsys.readouterr().out
    trained = open_trained(deepseek_recipe, str(run_checkpoint))
    direct = evaluate_checkpoint(trained.model, trained.encoding, tasks=[str(task)], limit=None, batch_size=8,
                                 device="cpu", max_length=trained.seq_len)["results"]
    (metrics,) = direct.values()
    assert "toy" in printed and f"{metrics['acc,none']:.4f}" in printed


def test_a_missing_checkpoint_is_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        deepseek_recipe.main(["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny LlamaForCausalLM with a Llama-3-style tokenizer.json, as transformers writes them."""
    from test_continue_hf import checkpoint, corpus

    root = tmp_path_factory.mktemp("released")
    checkpoint(root / "ckpt", corpus(root / "corpus"))
    return root / "ckpt"


def test_sample_from_a_transformers_folder_equals_transformers_generate(released, capsys):
    prompt = "river stone 2026"
    llama_recipe.main(["sample", "--checkpoint", str(released), "--prompt", prompt, "--max-new-tokens", "10"])
    printed = capsys.readouterr().out
    tok = tokenizers.Tokenizer.from_file(str(released / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(released)
    ids = [tok.token_to_id("<|end_of_text|>")] + tok.encode(prompt, add_special_tokens=False).ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                         eos_token_id=tok.token_to_id("<|end_of_text|>"), pad_token_id=0)[0, len(ids):].tolist()
    out = [t for t in out if t != tok.token_to_id("<|end_of_text|>")]
    assert printed == prompt + tok.decode(out) + "\n"


def test_perplexity_from_a_transformers_folder_equals_transformers_loss(released, tmp_path, capsys):
    text = "Document 7. north south quickly café 東京 print(x)\n"
    (tmp_path / "t.txt").write_text(text)
    llama_recipe.main(["perplexity", str(tmp_path / "t.txt"), "--checkpoint", str(released)])
    printed = capsys.readouterr().out
    tok = tokenizers.Tokenizer.from_file(str(released / "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(released)
    ids = torch.tensor([[tok.token_to_id("<|end_of_text|>")] + tok.encode(text, add_special_tokens=False).ids])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert f"loss {loss:.4f} nats/token" in printed
