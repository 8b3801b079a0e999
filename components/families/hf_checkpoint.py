"""A transformers checkpoint folder -> the family that reads it (by config.json's
`architectures`, else `model_type`), its model config and where each weight is.

    hf = read_config("ckpt/")                       # config.json as a dict
    model_config = config_from_hf(hf)               # fdl.Config[DecoderLM], nothing built
    load_into(model, "ckpt/")                       # `families.hf_weights`: each rank its shard

Layouts: LlamaForCausalLM (llama), GPT2LMHeadModel (gpt2), DeepseekV2/V3ForCausalLM
(deepseek; built without MTP modules, whose checkpoint layers are left unread).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fiddle as fdl
import torch

from tessera.components.families.deepseek import hf as deepseek_hf
from tessera.components.families.gpt2 import hf as gpt2_hf
from tessera.components.families.hf_weights import Source, load_hf_weights
from tessera.components.families.llama import hf as llama_hf
from tessera.components.model.decoder import DecoderLM

FAMILIES = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "DeepseekV2ForCausalLM": "deepseek",
            "DeepseekV3ForCausalLM": "deepseek"}
MODEL_TYPES = {"llama": "llama", "gpt2": "gpt2", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}


def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json of the checkpoint folder; FileNotFoundError saying what a folder must hold."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; give the folder of a transformers checkpoint "
                                f"(config.json, *.safetensors, tokenizer.json), e.g. one written by save_pretrained")
    return json.loads(file.read_text())


def family(hf: dict[str, Any]) -> str:
    """"llama", "gpt2" or "deepseek" for a config.json dict; ValueError listing the layouts read."""
    for architecture in hf.get("architectures") or []:
        if architecture in FAMILIES:
            return FAMILIES[architecture]
    if hf.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf["model_type"]]
    raise ValueError(f"config.json: architectures {hf.get('architectures')} / model_type {hf.get('model_type')!r} "
                     f"is not a layout tessera reads; supported: {sorted(FAMILIES)}")


def config_from_hf(hf: dict[str, Any]) -> fdl.Config[DecoderLM]:
    """The tessera model config equal to the checkpoint's (see each family's `config_from_hf`)."""
    name = family(hf)
    if name == "deepseek":
        return deepseek_hf.config_from_hf(hf, include_mtp=False)
    return (llama_hf if name == "llama" else gpt2_hf).config_from_hf(hf)


def sources(hf: dict[str, Any]) -> dict[str, Source]:
    """{our parameter (or buffer) name: its checkpoint tensor}, for `hf_weights.load_hf_weights`."""
    return {"llama": llama_hf, "gpt2": gpt2_hf, "deepseek": deepseek_hf}[family(hf)].sources(hf)


def load_into(model: torch.nn.Module, folder: str | Path) -> int:
    """Load the checkpoint in `folder` into `model` (built from its config.json, possibly laid
    out by a parallel plan: each process reads its own shard); returns the values read here.
    A DeepSeek checkpoint's MTP layers are left unread (the model is built without them)."""
    hf = read_config(folder)
    ignored = deepseek_hf.mtp_prefixes(hf) if family(hf) == "deepseek" else ()
    return load_hf_weights(model, folder, sources(hf), ignored=ignored)


def load_pretrained(folder: str | Path) -> DecoderLM:
    """The checkpoint in `folder` as a tessera model in one process, in fp32 (the stored
    weights are cast)."""
    model = fdl.build(config_from_hf(read_config(folder)))
    load_into(model, folder)
    return model
