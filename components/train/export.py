"""`--export-hf DIR`: write a trained model as a transformers checkpoint (config.json +
model.safetensors), picking the family layout that can hold it.

- a model with multi-head latent attention -> DeepSeek-V3 (sigmoid routing) or DeepSeek-V2
  (softmax routing), `tessera.components.families.deepseek.hf`;
- any other -> `LlamaForCausalLM`, `tessera.components.families.llama.hf`.

A model neither layout can express (ALiBi, learned positions, LayerNorm, GELU MLPs, sliding
windows, ...) is refused by `export_faults` on the meta-built model, before training starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import fiddle as fdl
import tiktoken
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from tessera.components.attention.mla import MultiHeadLatentAttention
from tessera.components.data.tokenizer_export import write_hf_tokenizer
from tessera.components.families.deepseek import hf as deepseek_hf
from tessera.components.families.hf_checkpoint import read_config
from tessera.components.families.llama import hf as llama_hf
from tessera.components.model.decoder import DecoderLM
from tessera.components.parallel.pipeline import PipelinedModel
from tessera.components.parallel.process_group import world
from tessera.registry.errors import Fault

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _family(model: DecoderLM):
    uses_mla = any(isinstance(m, MultiHeadLatentAttention) for m in model.modules())
    return (deepseek_hf, "DeepSeek-V2/V3") if uses_mla else (llama_hf, "LlamaForCausalLM")


def export_faults(model: DecoderLM) -> list[Fault]:
    """What stops `model` (meta-built is enough) from being exported, as config faults."""
    family, name = _family(model)
    return [Fault(problem.split(":")[0], f"the {name} checkpoint layout cannot express it:"
                  f"{problem.partition(':')[2]}", "drop --export-hf, or use a component that layout has")
            for problem in family.unsupported(model)]


def _gathered_stages(model: PipelinedModel) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the first process ({} on the others): each process's
    stages, gathered whole (FSDP shards of a stage too), on the CPU. A tensor held by
    several processes (a stage replicated over data-parallel ranks) is sent by one only."""
    # no cpu_offload: it keeps the tensors on rank 0 alone, dropping the other stages'
    mine = {name: tensor.cpu() for name, tensor in
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()}
    if world()[1] == 1:
        return mine
    names: list[Any] = [None] * world()[1]
    dist.all_gather_object(names, sorted(mine))
    sender: dict[str, int] = {}
    for rank, held in enumerate(names):
        for name in held:
            sender.setdefault(name, rank)
    rank = world()[0]
    parts: list[Any] | None = [None] * world()[1] if rank == 0 else None
    dist.gather_object({k: v for k, v in mine.items() if sender[k] == rank}, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if parts is not None else {}


def _copy_tokenizer(source: Path, folder: Path) -> None:
    """The source checkpoint's tokenizer files, unchanged (the run trained with exactly them)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def export_hf(model: DecoderLM | PipelinedModel, folder: str | Path, *, model_config: fdl.Buildable | None = None,
              max_position_embeddings: int = 4096, source: str | Path | None = None,
              encoding: tiktoken.Encoding | None = None) -> str | None:
    """Write `model` into `folder` as a transformers checkpoint; returns the architecture
    written (None on processes other than the first, which write nothing).

    `source`: the transformers checkpoint the run continued (`--from-hf`): its
    max_position_embeddings is kept and its tokenizer files are copied alongside, so the folder
    loads with `AutoTokenizer` too. `encoding`: otherwise, the tokenizer the run trained with,
    written as tokenizer.json (`tokenizer_export`) for the same purpose.

    A sharded model (DTensor parameters) or a pipelined one (each process holds its stages:
    a `PipelinedModel`) is gathered whole onto the CPU of the first process and loaded into
    an unsharded copy built from `model_config` (required then). Every process calls this.
    """
    pipelined = isinstance(model, PipelinedModel)
    if pipelined or any(isinstance(p, DTensor) for p in model.parameters()):
        if model_config is None:
            raise ValueError("export_hf: a sharded or pipelined model needs its model_config to rebuild a whole copy")
        full = _gathered_stages(model) if pipelined else \
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world()[0] != 0:
            return None
        model = fdl.build(model_config)
        model.load_state_dict(full)  # strict: every tensor of the model came from some stage
    elif world()[0] != 0:
        return None
    family, _ = _family(model)
    if source is not None:
        max_position_embeddings = read_config(source).get("max_position_embeddings", max_position_embeddings)
    with torch.no_grad():
        family.save_pretrained(model, folder, max_position_embeddings=max_position_embeddings)
    if source is not None:
        _copy_tokenizer(Path(source), Path(folder))
    elif encoding is not None:
        write_hf_tokenizer(encoding, folder)
    return (deepseek_hf.hf_config_of if family is deepseek_hf else llama_hf.hf_config_of)(
        model, max_position_embeddings=max_position_embeddings)["architectures"][0]
