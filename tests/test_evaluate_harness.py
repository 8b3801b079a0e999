"""The lm-evaluation-harness adapter: its log-likelihoods match a naive per-example forward,
its rolling windows match lm-eval's own, generation stops where it should, and
`lm_eval.simple_evaluate` scores a local task with the accuracy a hand-made model must get."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

import tiktoken  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from tessera.components.attention.gqa import GroupedQueryAttention  # noqa: E402
from tessera.components.evaluate.harness import TesseraLM, evaluate_checkpoint, format_table  # noqa: E402
from tessera.components.mlp.gated import SwiGLU  # noqa: E402
from tessera.components.model.block import TransformerBlock  # noqa: E402
from tessera.components.model.decoder import DecoderLM  # noqa: E402
from tessera.components.norm.rmsnorm import RMSNorm  # noqa: E402
from tessera.components.position.rope import RoPE  # noqa: E402

EOT = 256


def byte_encoding() -> tiktoken.Encoding:
    """A byte-level tiktoken encoding (no merges) with end-of-text 256: built offline."""
    return tiktoken.Encoding(name="test_bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": EOT})


def tiny_decoder(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    dim = 32

    def block() -> TransformerBlock:
        attention = GroupedQueryAttention(dim=dim, n_heads=4, n_kv_heads=2, position=RoPE())
        return TransformerBlock(attention=attention, feed_forward=SwiGLU(dim=dim, hidden_dim=48),
                                attention_norm=RMSNorm(dim=dim), ffn_norm=RMSNorm(dim=dim))

    model = DecoderLM(vocab_size=EOT + 1, dim=dim, layers=[block(), block()], norm=RMSNorm(dim=dim))
    with torch.no_grad():  # logits spread out enough that greedy choices are clear-cut
        model.head.weight.mul_(20)
    return model


class Successor(torch.nn.Module):
    """A bigram model that is all but certain the byte after b is b + 1."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(EOT + 1, EOT + 1)
        table[torch.arange(EOT + 1), (torch.arange(EOT + 1) + 1) % 256] = 30.0
        self.table = torch.nn.Parameter(table)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[tokens]


def request(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def naive_logprob(model: torch.nn.Module, context: list[int], continuation: list[int],
                  max_length: int) -> tuple[float, bool]:
    """One unpadded forward per request, the last max_length + 1 tokens kept."""
    whole = (context + continuation)[-(max_length + 1):]
    logp = model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)[-len(continuation):]
    target = torch.tensor(continuation)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_matches_a_naive_forward_per_request():
    model, encoding = tiny_decoder(), byte_encoding()
    pairs = [("The cat", " sat"), ("", "hello"), ("a b c ", "d"), ("x" * 40, " long context cut"), ("q", "r")]
    lm = TesseraLM(model, encoding, batch_size=2, max_length=24, device="cpu", precision="fp32")
    got = lm.loglikelihood([request("loglikelihood", p) for p in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        # the adapter's tokenization: end-of-text, the context without trailing spaces; they lead the continuation
        moved = context[len(context.rstrip(" ")):]
        ctx = [EOT, *context.rstrip(" ").encode()]
        want = naive_logprob(model, ctx, list((moved + continuation).encode()), max_length=24)
        assert logprob == pytest.approx(want[0], abs=1e-4)
        assert greedy == want[1]
    assert model.training  # the adapter restores the mode it found


def test_loglikelihood_rolling_matches_lm_evals_windows():
    model, encoding = tiny_decoder(seed=1), byte_encoding()
    text = "rolling windows score every token once " * 3
    lm = TesseraLM(model, encoding, batch_size=3, max_length=16, device="cpu")
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    windows = map(make_disjoint_window, get_rolling_token_windows(list(text.encode()), prefix_token=EOT,
                                                                  max_seq_len=16, context_len=1))
    want = sum(naive_logprob(model, ctx, cont, max_length=16)[0] for ctx, cont in windows)
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_stops_at_the_first_stop_string():
    model, encoding = tiny_decoder(seed=2), byte_encoding()
    with torch.no_grad():  # only lowercase letters score above 0: readable text, one stop string found once
        letters = torch.zeros(EOT + 1, dtype=torch.bool)
        letters[ord("a"):ord("z") + 1] = True
        model.head.weight[~letters] = 0
    lm = TesseraLM(model, encoding, batch_size=1, max_length=64, device="cpu", max_new_tokens=12)
    prompt = [EOT, *b"abc"]
    with torch.no_grad():  # naive greedy decoding: the whole sequence through the model each step
        tokens = list(prompt)
        for _ in range(12):
            nxt = int(model(torch.tensor([tokens]))[0, -1].argmax())
            if nxt == EOT:
                break
            tokens.append(nxt)
    free = encoding.decode(tokens[len(prompt):])
    assert len(free) == 12 and free.isalpha(), free
    (unstopped,) = lm.generate_until([request("generate_until", ("abc", {"until": []}))])
    assert unstopped == free
    stop = free[4:6]
    (stopped,) = lm.generate_until([request("generate_until", ("abc", {"until": ["\n\n", stop]}))])
    assert stopped == free[:free.index(stop)] and len(stopped) <= 4


def test_simple_evaluate_scores_a_local_task_with_the_known_accuracy(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # not the user's cache
    # Successor picks the choice starting with the byte after the context's last one; labels
    # point at it in 3 of 4 questions, so its accuracy must be exactly 0.75.
    rows = [{"context": "ab", "choices": ["c", "x"], "label": 0}, {"context": "kl", "choices": ["q", "m"], "label": 1},
            {"context": "rs", "choices": ["t", "z"], "label": 1}, {"context": "de", "choices": ["f", "g"], "label": 0}]
    path = tmp_path / "successor.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    results = evaluate_checkpoint(Successor(), byte_encoding(), tasks=[str(path)], limit=None, batch_size=4,
                                  device="cpu", max_length=16)
    assert results["results"]["successor"]["acc,none"] == 0.75
    table = format_table(results)
    assert "successor" in table and "0.75" in table


def test_bad_task_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 5}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'label' must be an integer index"):
        evaluate_checkpoint(Successor(), byte_encoding(), tasks=[str(path)], limit=None, batch_size=1, device="cpu")
