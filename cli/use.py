"""Use and judge a trained model from the recipe's command line:

    python recipes/X.py sample [--checkpoint PATH] --prompt TEXT [--max-new-tokens N] [--temperature T]
                               [--top-k K] [--top-p P] [--seed S] [--speculative] [--no-cache]
    python recipes/X.py perplexity FILE [--checkpoint PATH] [--stride N]
    python recipes/X.py evaluate [--checkpoint PATH] --tasks hellaswag,arc_easy [--limit N]

`--checkpoint` defaults to the newest checkpoint the recipe's default preset wrote, and may
name a transformers model folder (see `tessera.cli.trained`). A checkpoint that cannot be
opened, or a file that cannot be read, ends in one message (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.markup import escape

from tessera.registry.errors import ConfigError

if TYPE_CHECKING:
    from tessera.cli.recipe import Recipe
    from tessera.cli.trained import Trained

COMMANDS = ("sample", "perplexity", "evaluate")


def _parser(recipe: Recipe) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python recipes/{recipe.name}.py",
                                     description="use and judge a trained model")
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoint = dict(metavar="PATH", help="a run's checkpoints folder, one checkpoint, or a transformers model folder "
                                           "(default: the newest checkpoint of the default preset)")
    sample = commands.add_parser("sample", help="continue a prompt, printing tokens as they come")
    sample.add_argument("--checkpoint", **checkpoint)
    sample.add_argument("--prompt", required=True, help="the text to continue")
    sample.add_argument("--max-new-tokens", type=int, default=100)
    sample.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--speculative", action="store_true",
                        help="greedy with the MTP module drafting the next-next token (DeepSeek-V3 §5.4.3)")
    sample.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each token (slow)")
    ppl = commands.add_parser("perplexity", help="loss and bits per byte of a text file")
    ppl.add_argument("file", help="a UTF-8 text file, scored as one document")
    ppl.add_argument("--checkpoint", **checkpoint)
    ppl.add_argument("--stride", type=int, default=None, help="tokens each window advances (default: half the context)")
    ppl.add_argument("--batch-size", type=int, default=8)
    evaluate = commands.add_parser("evaluate", help="lm-evaluation-harness tasks, printed as its table")
    evaluate.add_argument("--checkpoint", **checkpoint)
    evaluate.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    evaluate.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    return parser


def use_cli(recipe: Recipe, argv: list[str]) -> None:
    """Run one of `COMMANDS` (argv[0]) with its arguments."""
    from tessera.cli.trained import open_trained

    ns = _parser(recipe).parse_args(argv)
    err = Console(stderr=True)
    try:
        trained = open_trained(recipe, ns.checkpoint)
        err.print(f"{ns.command}: {trained.source}", markup=False, highlight=False)
        if ns.command == "sample":
            _sample(trained, ns)
        elif ns.command == "perplexity":
            _perplexity(trained, ns)
        else:
            _evaluate(trained, ns)
    except (ConfigError, FileNotFoundError, UnicodeDecodeError, ValueError, ImportError) as error:
        err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _sample(trained: Trained, ns: argparse.Namespace) -> None:
    from tessera.components.generate import generate, speculative_generate

    prompt = trained.encode(ns.prompt)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens

    def show(row: int, token: int) -> None:
        if token != trained.eos_id:
            sys.stdout.write(decoder.decode(trained.encoding.decode_single_token_bytes(token)))
            sys.stdout.flush()

    sys.stdout.write(ns.prompt)
    if ns.speculative:
        _, stats = speculative_generate(trained.model, [prompt], max_new_tokens=ns.max_new_tokens,
                                        eos_id=trained.eos_id, on_token=show)
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        print(f"speculative: {stats.accepted} of {stats.drafted} drafts accepted "
              f"({stats.acceptance_rate:.0%})", file=sys.stderr)
        return
    generate(trained.model, [prompt], max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
             top_k=ns.top_k, top_p=ns.top_p, eos_id=trained.eos_id, use_cache=not ns.no_cache,
             generator=torch.Generator().manual_seed(ns.seed), on_token=show)
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")


def _perplexity(trained: Trained, ns: argparse.Namespace) -> None:
    from tessera.components.evaluate.perplexity import perplexity

    text = Path(ns.file).read_text(encoding="utf-8")
    tokens = trained.encode(text)
    if len(tokens) < 2:
        raise ValueError(f"{ns.file} holds no text to score")
    result = perplexity(trained.model, tokens, text_bytes=len(text.encode()), seq_len=trained.seq_len,
                        stride=ns.stride, batch_size=ns.batch_size)
    print(f"{ns.file}: {result.tokens:,} tokens, {result.bytes:,} bytes; loss {result.loss:.4f} nats/token, "
          f"perplexity {result.perplexity:.2f}, {result.bits_per_byte:.4f} bits/byte")


def _evaluate(trained: Trained, ns: argparse.Namespace) -> None:
    from tessera.components.evaluate.harness import evaluate_checkpoint, format_table

    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    results = evaluate_checkpoint(trained.model, trained.encoding, tasks=tasks, limit=ns.limit,
                                  batch_size=ns.batch_size, device="cpu", max_length=trained.seq_len)
    print(format_table(results))
