"""Run on several processes by tests/test_tensor_parallel.py: each case trains the parallel model (TP,
or FSDP x TP) and, inside the same processes, the single-process reference on the same batches;
rank 0 prints `CASE <json>` with what the tests compare.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/tensor_parallel.py \
        '[{"model": "llama", "sp": true, "loss_parallel": true, "dp": 1, "tied": false}, ...]'
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tessera.cli import resolve
from tessera.components.interfaces import OptimizerStepHook
from tessera.components.model.decoder import cross_entropy
from tessera.components.parallel import sharding
from tessera.components.parallel.tensor_parallel import apply_tensor_parallel
from tessera.components.train.divergence import clip_gradients
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain

RECIPES = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}
STEPS, BATCH, SEQ = 3, 4, 32


def full(param):
    return param.full_tensor() if isinstance(param, DTensor) else param


def build(config, mesh, case):
    torch.manual_seed(0)
    model = build_model_on_meta(config.model)
    if mesh is None:  # one process's model, initialised as the single-process plan does
        model.to_empty(device="cpu")
        if case["tied"]:  # to_empty gives each module its own copy of a shared parameter: share it again
            model.head.weight = model.embedding.weight
        model.init_weights()
        return model
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=case["sp"], loss_parallel=case["loss_parallel"])
    if case["dp"] > 1:  # FSDP2 over the data-parallel dim, after TP
        sharding.shard(model, mesh["dp"], reshard_after_forward=True, param_dtype=None, reduce_dtype=None)
    sharding.materialize_sharded(model, "cpu")
    return model


def step(model, optimizer, tokens, doc_ids, dp_group):
    terms = model.losses(tokens[:, :-1], tokens[:, 1:], doc_ids=doc_ids)
    torch.stack(list(terms.values())).sum().backward()
    norm, _ = clip_gradients(list(model.named_parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    for module in model.modules():
        if isinstance(module, OptimizerStepHook):
            module.after_optimizer_step()
    values = torch.stack([t.detach() for t in terms.values()])
    if dp_group is not None:  # each data-parallel rank's loss is over its part of the batch
        dist.all_reduce(values, group=dp_group)
        values /= dist.get_world_size(dp_group)
    return dict(zip(terms, values.tolist())), norm.item()


def run_case(case: dict) -> None:
    """Train `case` both ways; rank 0 prints what the tests compare."""
    extra = ["model.layers[*].attention.dropout=0.0"] if case["model"] == "llama" else []
    extra += ["model.tie_embeddings=True"] if case["tied"] else []
    config, _ = resolve(RECIPES[case["model"]], ["debug", "precision=@fp32", *extra])
    dp, tp = case["dp"], dist.get_world_size() // case["dp"]
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    reference, parallel = build(config, None, case), build(config, mesh, case)
    start = {name: param.detach().clone() for name, param in reference.named_parameters()}
    initial_diff = max((full(p) - start[n]).abs().max().item() for n, p in parallel.named_parameters())
    generator = torch.Generator().manual_seed(1)
    dp_rank = mesh["dp"].get_local_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, eps=1e-5) for m in (reference, parallel)]
    losses = {"reference": [], "parallel": []}
    for _ in range(STEPS):
        tokens = torch.randint(0, config.model.vocab_size, (BATCH, SEQ + 1), generator=generator)
        # packed documents: a boundary at a random position in each row
        doc_ids = (torch.arange(SEQ)[None] >= torch.randint(1, SEQ, (BATCH, 1), generator=generator)).long()
        losses["reference"].append(step(reference, optimizers[0], tokens, doc_ids, None))
        losses["parallel"].append(step(parallel, optimizers[1], tokens[rows], doc_ids[rows],
                                       mesh["dp"].get_group() if dp > 1 else None))
    with torch.no_grad():  # evaluation: the forward alone, then the loss outside any training step
        logits = parallel(tokens[rows, :-1])
        evaluated = [cross_entropy(logits, tokens[rows, 1:]).item(),
                     cross_entropy(reference(tokens[rows, :-1]), tokens[rows, 1:]).item()]
    diffs = {n: (full(p) - r).abs().max().item() for (n, r), (_, p) in
             zip(reference.named_parameters(), parallel.named_parameters())}
    moved = {n: (r - start[n]).abs().max().item() for n, r in reference.named_parameters()}
    if dist.get_rank() == 0:
        shown = dict(type=type(logits).__name__, placements=[str(p) for p in getattr(logits, "placements", [])],
                     local_shape=list(getattr(logits, "_local_tensor", logits).shape))
        print("CASE", json.dumps(dict(case=case, losses=losses, initial_diff=initial_diff, param_diff=diffs,
                                      moved=moved, logits=shown, evaluated=evaluated, tied=parallel.tied,
                                      vocab=config.model.vocab_size)), flush=True)
    dist.barrier()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for case in json.loads(sys.argv[1]):
        run_case(case)


if __name__ == "__main__":
    main()
