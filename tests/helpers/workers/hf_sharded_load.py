"""Run under torchrun by tests/test_continue_hf.py: a transformers checkpoint in FOLDER loaded
into the model laid out by `parallel=@fsdp`; rank r writes OUT/rank-r.json with, per parameter,
whether it is a DTensor, its local and whole shapes, the values this rank read, and whether
the local piece equals the rank's chunk of the whole tensor transformers itself loads.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/hf_sharded_load.py FOLDER OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tessera.components.families.hf_checkpoint import config_from_hf, read_config, sources
from tessera.components.families.hf_weights import load_hf_weights
from tessera.components.parallel.fsdp import FullyShardedDataParallel
from tessera.components.train.launch import build_model_on_meta


def reference(folder: str) -> dict[str, torch.Tensor]:
    """The whole tensors of the checkpoint file, under our names (mapped here by hand)."""
    from safetensors.torch import load_file

    renames = [("model.embed_tokens", "embedding"), ("model.norm", "norm"), ("lm_head", "head"),
               ("model.layers", "layers"), ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
               ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
               ("mlp.gate_proj", "feed_forward.w_gate"), ("mlp.up_proj", "feed_forward.w_up"),
               ("mlp.down_proj", "feed_forward.w_down"), ("input_layernorm", "attention_norm"),
               ("post_attention_layernorm", "ffn_norm")]
    out = {}
    for name, tensor in load_file(f"{folder}/model.safetensors").items():
        for theirs, ours in renames:
            name = name.replace(theirs, ours)
        out[name] = tensor
    return out


def main() -> None:
    folder = sys.argv[1]
    hf = read_config(folder)
    plan = FullyShardedDataParallel()
    model = plan.apply(build_model_on_meta(config_from_hf(hf)), device="cpu")
    plan.materialize(model, "cpu")
    read = load_hf_weights(model, folder, sources(hf))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    whole = reference(folder)
    report = {"read": read, "total": sum(t.numel() for t in whole.values()), "params": {}}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        chunk = torch.chunk(whole[name], world, dim=0)[rank]  # FSDP2's dim-0 shard of this rank
        report["params"][name] = {"dtensor": isinstance(param, DTensor), "local": list(local.shape),
                                  "whole": list(param.shape), "equal": bool(torch.equal(local.detach(), chunk))}
    # a file per rank: two ranks' long lines on one pipe can interleave
    Path(sys.argv[2], f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
