"""The test-only MoE (helpers.routed_moe) under expert and tensor parallelism, against one process.

    PYTHONPATH=tests python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/capabilities.py OUT

Trains the reference on every process, then ep=2 and tp=2; rank 0 writes {"reference": losses,
"ep": {...}, "tp": {...}} as JSON to OUT. Launched by tests/test_capabilities.py.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tessera.components.moe.expert_parallel import apply_expert_parallel, reduce_expert_gradients
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.parallel.sharding import materialize_sharded
from tessera.components.parallel.tensor_parallel import apply_tensor_parallel
from tessera.components.train.launch import build_model_on_meta

from helpers.routed_moe import decoder_config

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
STEPS, BATCH, SEQ, VOCAB = 2, 4, 16, 64


def build(split):
    torch.manual_seed(0)
    model = build_model_on_meta(decoder_config(vocab=VOCAB))
    if split is None:
        model.to_empty(device="cpu")
        model.init_weights()
    else:
        split(model)
        materialize_sharded(model, "cpu")
    return model


def average_plain_gradients(model):
    """What DDP does for the parameters outside the experts (ep shards see different rows)."""
    for param in model.parameters():
        if param.grad is not None and not isinstance(param.grad, DTensor):
            dist.all_reduce(param.grad)
            param.grad /= world
    reduce_expert_gradients(model)


def train(model, rows, sync):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)[rows]
        loss = sum(model.losses(tokens[:, :-1], tokens[:, 1:]).values())
        loss.backward()
        if sync is not None:
            sync(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def full(param):
    return param.full_tensor() if isinstance(param, DTensor) else param


def main() -> None:
    reference = build(None)
    result = {"reference": train(reference, slice(None), None)}
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for label, split, rows, sync in (
            ("ep", lambda m: apply_expert_parallel(m, mesh), mine, average_plain_gradients),
            ("tp", lambda m: apply_tensor_parallel(m, mesh), slice(None), None)):
        model = build(split)
        losses = torch.tensor(train(model, rows, sync))
        if label == "ep":  # each process's loss is over its own rows
            dist.all_reduce(losses)
            losses /= world
        bank = model.layers[0].feed_forward.routed_experts
        result[label] = dict(
            losses=losses.tolist(),
            diff=max((full(p) - r).abs().max().item()
                     for p, r in zip(model.parameters(), reference.parameters(), strict=True)),
            expert_local_shape=list(bank.w_in.to_local().shape),
            plain=[name for name, p in model.named_parameters() if not isinstance(p, DTensor)],
            sent=getattr(bank.expert_parallel, "sent", None), received=getattr(bank.expert_parallel, "received", None))
    if rank == 0:  # a file, not stdout: the processes share one pipe
        Path(sys.argv[1]).write_text(json.dumps(result))
    leave_process_group()


if __name__ == "__main__":
    main()
