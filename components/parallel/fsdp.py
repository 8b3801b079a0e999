"""Fully sharded data parallel (FSDP2): every process holds 1/N of each parameter, gradient
and optimizer state, and trains on 1/N of each batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from components.interfaces import ParallelPlan, PrecisionPolicy
from components.parallel.process_group import ensure_process_group, world
from registry.kinds import PARALLEL_PLAN


@PARALLEL_PLAN.register("fsdp")
class FullyShardedDataParallel(ParallelPlan):
    """Shards each transformer block (and each MTP module's block) as one FSDP unit and the
    rest (embedding, norms, head, MTP projections) as the root unit, on a 1-D mesh over all
    processes.

    Launch with `torchrun --nproc-per-node N recipes/<recipe>.py ... parallel=@fsdp` (add
    `device=cuda` on GPUs: each process then uses GPU LOCAL_RANK); a plain `python` run is a
    group of one. The run's `batch_size` stays the global number of
    sequences per step; each rank trains on its 1/N share (the data loader hands ranks
    disjoint sequences of one stream), and gradients are averaged across ranks, so N
    processes step exactly as one process with the whole batch would (up to summation order).

    `reshard_after_forward`: free the gathered parameters after each block's forward
    (ZeRO-3; least memory) or keep them until the backward (ZeRO-2-like; less communication).
    `reduce_dtype`: dtype gradients are reduced in (None: the parameters' dtype).
    """

    def __init__(self, *, reshard_after_forward: bool = True, reduce_dtype: torch.dtype | None = None):
        self.reshard_after_forward = reshard_after_forward
        self.reduce_dtype = reduce_dtype

    def apply(self, model: nn.Module, *, precision: PrecisionPolicy | None = None,
              device: str = "cpu") -> nn.Module:
        ensure_process_group()
        _, size = world()
        mesh = init_device_mesh(torch.device(device).type, (size,), mesh_dim_names=("dp",))
        # A policy with low-precision parameters (bf16_params) is FSDP's mixed precision: the
        # sharded parameters (the masters) and optimizer state stay fp32, each unit's gathered
        # copy is cast to `param_dtype` for forward and backward.
        param_dtype = precision.param_dtype if precision is not None else None
        options = dict(mesh=mesh, reshard_after_forward=self.reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=self.reduce_dtype))
        # An MTP module's norms are also used outside its forward (the head norm), so only its
        # block is a unit of its own; the rest belongs to the root unit, gathered for all of `losses`.
        for unit in model.blocks():
            fully_shard(unit, **options)
        fully_shard(model, **options)
        if hasattr(model, "losses"):  # the trainer's entry point: gather the root's weights for it too
            register_fsdp_forward_method(model, "losses")
        return model

    def materialize(self, model: nn.Module, device: str) -> None:
        """Initialise full-size weights in the single-process order, then keep this rank's
        shard, so N processes start from exactly the weights one process would (sharded
        random init would draw the same numbers on every rank). Holds one full copy of the
        weights per process while initialising."""
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

    @property
    def is_main_process(self) -> bool:
        return world()[0] == 0
