"""Open a trained model for use: a run's checkpoint or a transformers folder, with its tokenizer.

`--checkpoint` may name
- nothing: the newest intact checkpoint of the recipe's default preset (where
  `python recipes/X.py` just wrote it);
- a run's checkpoint folder (`.../checkpoints`): its newest intact checkpoint;
- one checkpoint (`.../checkpoints/step-300`): that one;
- a transformers checkpoint folder (config.json with `architectures`, safetensors weights,
  tokenizer.json): a released model, read with its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fiddle as fdl
import tiktoken
from torch import nn

from tessera.registry import serialize
from tessera.registry.errors import ConfigError, Fault

if TYPE_CHECKING:
    from tessera.cli.recipe import Recipe


@dataclasses.dataclass(kw_only=True)
class Trained:
    """A model ready to score and sample (CPU, fp32, eval mode) with what reading text needs:
    its `encoding`, the ids a document starts with (`prefix`: the document separator our runs
    pack between documents, a transformers tokenizer's BOS), the id that ends a document
    (`eos_id`), its training context `seq_len`, and where it came from (`source`)."""

    model: nn.Module
    encoding: tiktoken.Encoding
    prefix: list[int]
    eos_id: int | None
    seq_len: int
    source: str

    def encode(self, text: str) -> list[int]:
        """`text` as one document: the prefix, then its tokens (special-token strings in the
        text are read as plain text)."""
        return self.prefix + self.encoding.encode_ordinary(text)


def open_trained(recipe: Recipe, checkpoint: str | None) -> Trained:
    """The model `checkpoint` names (see the module doc); a clear `ConfigError` when it names
    nothing usable."""
    path = _checkpoint_path(recipe, checkpoint)
    if _is_transformers_folder(path):
        return _open_transformers(path)
    return _open_run_checkpoint(path)


def _checkpoint_path(recipe: Recipe, given: str | None) -> Path:
    from tessera.components.train.checkpoint import Checkpointer

    if given is None:
        config = recipe.config(None)
        folder = getattr(config.__arguments__.get("checkpoint"), "folder", None)
        if folder is None:
            raise ConfigError([Fault("--checkpoint", f"{recipe.name}'s default preset writes no checkpoints",
                                     "pass --checkpoint PATH")])
        path = Path(folder)
    else:
        path = Path(given)
    if not path.exists():
        raise ConfigError([Fault("--checkpoint", f"{path} does not exist",
                                 f"train first (python recipes/{recipe.name}.py) or pass --checkpoint PATH to a run's "
                                 f"checkpoints folder, one checkpoint in it, or a transformers model folder")])
    if (path / "COMPLETE").exists() or _is_transformers_folder(path):
        return path
    latest = Checkpointer(folder=str(path)).latest()
    if latest is None:
        raise ConfigError([Fault("--checkpoint", f"{path} holds no complete checkpoint",
                                 "pass a folder with step-N checkpoints, one checkpoint, or a transformers model "
                                 "folder (config.json + *.safetensors)")])
    return latest


def _is_transformers_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        fields = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(fields, dict) and ("architectures" in fields or "model_type" in fields)


def _open_run_checkpoint(path: Path) -> Trained:
    from tessera.components.train.checkpoint import load_model

    config = serialize.load(str(path / "config.json"))
    model = load_model(path).eval()
    encoding = _run_encoding(config, path)
    # runs pack documents as doc EOS doc EOS ...: a document starts after the separator
    return Trained(model=model, encoding=encoding, prefix=[encoding.eot_token], eos_id=encoding.eot_token,
                   seq_len=int(config.__arguments__.get("seq_len", 2048)), source=str(path))


def _run_encoding(config: Any, path: Path) -> tiktoken.Encoding:
    """The tokenizer the run trained on: the one its checkpoint carries, else the one its data
    pipeline prepared (still in the data cache when the corpus is where the run read it)."""
    from tessera.components.data.tokenizer import load_encoding

    if (path / "tokenizer" / "tokenizer.tiktoken").exists():
        return load_encoding(path / "tokenizer")
    data = fdl.build(config.data)
    try:
        return data.encoding()
    except (FileNotFoundError, OSError) as err:
        raise ConfigError([Fault("--checkpoint", f"{path} carries no tokenizer and the run's prepared data is not "
                                 f"here ({err})", "run from the folder the training ran in (its runs/data cache), "
                                 "or prepare the run's data again: python -m tessera.cli.prepare ...")]) from None


def _open_transformers(path: Path) -> Trained:
    from tessera.components.data.hf_tokenizer import hf_encoding, tokenizer_file
    from tessera.components.families.hf_checkpoint import load_pretrained, read_config

    hf = read_config(path)
    encoding = hf_encoding(path)
    seq_len = int(hf.get("max_position_embeddings") or hf.get("n_positions") or 2048)
    return Trained(model=load_pretrained(path).eval(), encoding=encoding, prefix=_document_start(tokenizer_file(path),
                   encoding), eos_id=encoding.eot_token, seq_len=seq_len, source=str(path))


def _document_start(file: Path, encoding: tiktoken.Encoding) -> list[int]:
    """The ids transformers' tokenizer puts before a text (the special tokens that open its
    post-processor's single-sequence template: Llama 3's <|begin_of_text|>); none there, the
    end-of-document token, which is what precedes a document in packed pretraining (GPT-2)."""
    spec = json.loads(file.read_text(encoding="utf-8")).get("post_processor") or {}
    steps = spec.get("processors", []) if spec.get("type") == "Sequence" else [spec]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            opening = []
            for piece in step.get("single", []):
                if "SpecialToken" not in piece:
                    break
                opening.append(encoding.encode_single_token(piece["SpecialToken"]["id"]))
            if opening:
                return opening
    return [encoding.eot_token]
