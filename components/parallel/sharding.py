"""FSDP2 sharding of a `DecoderLM` over a 1-D mesh (FSDP) or a 2-D (replicate, shard) mesh
(HSDP), and the initialisation of sharded weights that matches one process's."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool, param_dtype: torch.dtype | None,
          reduce_dtype: torch.dtype | None, ignored_params: set[nn.Parameter] | None = None) -> nn.Module:
    """Shard each block of `model.blocks()` (the main layers' and the MTP modules') as one FSDP
    unit and the rest (embedding, norms, head, MTP projections) as the root unit.

    `mesh`: 1-D (every process holds 1/N of each parameter) or 2-D with dims (replicate,
    shard): HSDP, parameters sharded along the second dim and replicated along the first;
    FSDP2 all-reduces the reduce-scattered gradients across the replicas.
    `param_dtype`: the dtype each unit's gathered copy is cast to for forward and backward
    (FSDP's mixed precision; the sharded masters and optimizer state stay as they are).
    `reduce_dtype`: the dtype gradients are reduced in (None: the parameters').
    `ignored_params`: parameters FSDP leaves alone (routed experts sharded by expert parallelism).
    """
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                   ignored_params=ignored_params)
    # An MTP module's norms are also used outside its forward (the head norm), so only its
    # block is a unit of its own; the rest belongs to the root unit, gathered for all of `losses`.
    for unit in model.blocks():
        fully_shard(unit, **options)
    fully_shard(model, **options)
    if hasattr(model, "losses"):  # the trainer's entry point: gather the root's weights for it too
        register_fsdp_forward_method(model, "losses")
    return model


def materialize_sharded(model: nn.Module, device: str) -> None:
    """Initialise full-size weights in the single-process order, then keep this rank's shard,
    so N processes start from exactly the weights one process would (sharded random init
    would draw the same numbers on every rank). Holds one full copy of the weights per
    process while initialising."""
    model.to_empty(device=device)
    shards: dict[int, DTensor] = {}
    full: dict[int, nn.Parameter] = {}
    owners = [(module, name, param) for module in model.modules() for name, param in module._parameters.items()
              if isinstance(param, DTensor)]
    for module, name, param in owners:  # a tied weight appears under two modules: one full tensor
        shards[id(param)] = param
        full.setdefault(id(param), nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device)))
        module._parameters[name] = full[id(param)]
    try:
        model.init_weights()
    finally:
        for module, name, param in owners:
            module._parameters[name] = param
    with torch.no_grad():
        for key, param in shards.items():
            local = distribute_tensor(full[key].detach(), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
