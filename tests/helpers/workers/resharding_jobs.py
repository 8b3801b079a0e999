"""Run on several processes by tests/test_resharding.py: train or resume recipe jobs under a parallel
plan and write, per rank, what each job's final model holds.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/resharding_jobs.py JOBS.json

JOBS.json is a list of {label, recipe, args, folder, resume, out, export}: `args` are recipe
overrides (the plan included); `folder` is where checkpoints are written (every `steps`);
`resume` is a checkpoint path to resume from (the run is already finished there, so nothing
trains: the job only loads it under its own plan) or null; `export` a folder to write the
final model into as a transformers checkpoint, or null.

For each job every rank writes `<out>.rank<R>.safetensors` holding
- `model.<name>`: every weight and buffer this rank's model holds, whole (sharded ones gathered);
- `optim.<key>`: the optimizer state of those parameters, whole (flattened names);
- `logits`: the logits [B, T, V] of `fixed_tokens` in eval mode, whole, on the ranks that
  compute them (every rank, except under pipeline parallelism: the last stage's).
A pipelined rank holds only its stages: the union over ranks is the whole model.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

import fiddle as fdl
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from tessera.cli import resolve
from tessera.components.parallel.pipeline import PipelinedModel
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.position.absolute import AbsoluteEncoding
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.export import export_hf
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.registry import serialize

RECIPES = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}
BATCH, LENGTH = 2, 32  # the fixed batch's shape (LENGTH divisible by tp for sequence parallelism)


def fixed_tokens(vocab_size: int) -> torch.Tensor:
    """The batch [BATCH, LENGTH] of token ids every job computes logits of (same on every rank)."""
    return torch.randint(0, vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1234))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


@torch.no_grad()
def pipeline_logits(model: PipelinedModel, tokens: torch.Tensor, group: Any) -> torch.Tensor | None:
    """Logits of `tokens` through the pipeline's stages in order, each run on the rank that
    holds it with the submodules it holds (embedding -> layers -> ... -> norm -> head); the
    hidden states [B, T, D] travel between ranks by send/recv. Returns the logits on the
    rank holding the last stage, None elsewhere. One stage per rank (GPipe/1F1B layout)."""
    (stage,) = model.stages
    if isinstance(stage, FSDPModule):  # a stage sharded by FSDP2 (its root): gather the weights its
        stage.unshard()                # submodules use outside its forward (its blocks gather their own)
    me, size = dist.get_rank(group), dist.get_world_size(group)
    if stage.spec.first:
        if isinstance(stage.position, AbsoluteEncoding):
            raise NotImplementedError("learned positions: not needed by these recipes")
        x = stage.embedding_dropout(stage.embedding(tokens))
    else:
        x = torch.empty(*tokens.shape, model.dim)
        dist.recv(x, group=group, group_src=me - 1)
    for layer in stage.layers.values():
        x = layer(x)
    out = stage.head(stage.norm(x)) if stage.spec.last else None
    if not stage.spec.last:
        dist.send(x.contiguous(), group=group, group_dst=(me + 1) % size)
    if isinstance(stage, FSDPModule):
        stage.reshard()
    return out


def logits(model: nn.Module, plan: Any, vocab_size: int) -> torch.Tensor | None:
    """`model`'s logits [B, T, V] of the fixed batch, whole (vocabulary-sharded ones
    gathered), or None on a pipeline rank without the last stage."""
    model.eval()
    tokens = fixed_tokens(vocab_size)
    if isinstance(model, PipelinedModel):
        out = pipeline_logits(model, tokens, plan.dims.get_mesh("pp").get_group())
    else:
        with torch.no_grad():
            out = model(tokens)
    return None if out is None else _whole(out)


def run(job: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train (or resume) `job` under its plan; returns its per-step losses and this rank's
    `model.*` / `optim.*` / `logits` tensors (see the module docstring). Runs in one process
    too (plan @single), where the tensors are the whole model's."""
    config, _ = resolve(RECIPES[job["recipe"]], job["args"])
    config.metrics = None
    config.checkpoint = fdl.Config(Checkpointer, folder=job["folder"], every=10**6, keep=1,
                                   resume=job["resume"] or False)
    run_config = copy.copy(config)
    run_config.model = build_model_on_meta(config.model)  # as `launch` does, without leaving the process group
    train = fdl.build(run_config)
    train.keywords["checkpoint"].run_config = serialize.dumps(config)  # as `launch` does: config.json
    plan = train.keywords["parallel"]
    made: list[torch.optim.Optimizer] = []
    wrap = plan.wrap_optimizer

    def recorded(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        made.append(wrap(optimizer))  # what the trainer steps and checkpoints (ZeRO-1's, not the bare one)
        return made[-1]

    plan.wrap_optimizer = recorded
    result = train()
    model, (optimizer,) = result.model, made
    whole = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)  # no cpu_offload: every rank
    tensors = {f"model.{k}": _whole(v) for k, v in get_model_state_dict(model, options=whole).items()}
    tensors.update({f"optim.{k}": _whole(v) for k, v in get_optimizer_state_dict(model, optimizer, options=whole)
                    .items() if isinstance(v, torch.Tensor)})
    out = logits(model, plan, config.model.vocab_size)
    if out is not None:
        tensors["logits"] = out
    if job.get("export"):
        export_hf(model, job["export"], model_config=config.model, max_position_embeddings=LENGTH)
    return result.losses, tensors


def main() -> None:
    """Run the jobs of JOBS.json in order, each on every rank; write each rank's tensors."""
    rank = os.environ["RANK"]
    for job in json.loads(open(sys.argv[1]).read()):
        losses, tensors = run(job)
        save_file(tensors, f"{job['out']}.rank{rank}.safetensors")
        dist.barrier()
        if rank == "0":
            print("DONE", job["label"], json.dumps(losses), flush=True)
    leave_process_group()


if __name__ == "__main__":
    main()
