"""The tensor-parallel styles the blocks' plans are written in: torch's column-wise, row-wise
and sequence-parallel styles, torchtitan's replicated one, and two of our own for the places
where activations leave DTensor for plain local tensors (per-rank attention heads, a
replicated MoE).

A block's `tensor_parallel_plan(output_layout=...)` maps its submodules' relative names to
these styles. Its contract: the block's input arrives as a DTensor replicated over the tensor
-parallel ("tp") mesh (the caller prepares it), and its output leaves as a DTensor with
`output_layout` (`Shard(1)`: sharded along the sequence, for sequence parallelism; or
`Replicate()`).

Gradients of plain local tensors: inside an attention each rank computes only its own heads,
so a tensor whose *value* is the same on every rank (the input, MLA's shared rope key) gets a
*partial* gradient on each rank (the sum over ranks is the true one). Where such a tensor
leaves DTensor, `to_local(grad_placements=[Partial()])` says so, and DTensor sums the parts
in the backward (a reduce-scatter under sequence parallelism).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

__all__ = ["ParallelStyle", "ColwiseParallel", "PrepareModuleInput", "PrepareModuleInputOutput", "PrepareModuleOutput",
           "SequenceParallel", "RowwiseParallel",
           "Placement", "Replicate", "Shard", "SEQUENCE", "colwise", "rowwise", "per_head_norm", "replicated",
           "LocalInputs", "ReplicatedCompute"]

SEQUENCE = Shard(1)
"""The sequence-parallel layout of [B, T, D] activations: each tp rank holds T / tp positions."""


def replicated(*, use_local_output: bool = False) -> ParallelStyle:
    """Parameters replicated on every tp rank and computed on replicated DTensor inputs
    (norms outside sequence parallelism, MLA's low-rank down-projections and their norms, the
    MTP projection). torchtitan's `NoParallel`: it makes the parameters Replicate DTensors so
    that every parameter lives on the tp mesh (gradient clipping and the optimizer's foreach
    kernels need one mesh), and DTensor reduces their gradients where they come out partial."""
    from torchtitan.distributed.tensor_parallel import NoParallel

    return NoParallel(use_local_output=use_local_output)


class LocalInputs(ParallelStyle):
    """Turns the module's DTensor positional inputs into plain local tensors whose gradients
    are partial sums over the tp ranks (`grad_placements=[Partial()]`), and leaves its
    parameters alone.

    For a module whose output only this rank's attention heads read, e.g. the rotary
    encoding of MLA's shared rope key: the key's value is the same on every rank, but each
    rank backpropagates only through its own heads."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def localize(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(arg.to_local(grad_placements=[Partial()]) if isinstance(arg, DTensor) else arg
                         for arg in args)

        module.register_forward_pre_hook(localize)
        return module


class ReplicatedCompute(ParallelStyle):
    """The module (and everything under it) runs on plain local tensors exactly as in one
    process, on every tp rank: its parameters are stored as Replicate DTensors on the tp mesh
    (one mesh for every parameter) and swapped for their local values for the forward.

    The caller must hand it replicated plain inputs whose gradients are whole on each rank
    (`PrepareModuleInput(..., use_local_output=True)`): then each rank's parameter gradients
    are the whole gradients too, and nothing is communicated. Used for MoE routing and routed
    experts under tensor parallelism (every rank routes all tokens and runs every expert)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and not isinstance(param, DTensor):
                    sub.register_parameter(name, nn.Parameter(
                        distribute_tensor(param.data, device_mesh, [Replicate()]), requires_grad=param.requires_grad))
        swapped: list[tuple[nn.Module, str, torch.Tensor]] = []

        def to_local(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            for sub in module.modules():
                for name, param in sub._parameters.items():
                    if isinstance(param, DTensor):
                        swapped.append((sub, name, param))
                        sub._parameters[name] = param.to_local()  # differentiable: grads reach the DTensor

        def restore(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
            while swapped:
                sub, name, param = swapped.pop()
                sub._parameters[name] = param

        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(restore)
        return module


def colwise() -> ParallelStyle:
    """Column-wise (output features sharded) linear whose output stays this rank's local slice."""
    return ColwiseParallel()


def rowwise(output_layout: Placement) -> ParallelStyle:
    """Row-wise (input features sharded) linear whose partial outputs are summed into a DTensor
    with `output_layout` (a reduce-scatter for `Shard(1)`, an all-reduce for `Replicate()`)."""
    return RowwiseParallel(output_layouts=output_layout, use_local_output=False)


def per_head_norm() -> ParallelStyle:
    """A norm applied per head (QK-norm) to this rank's heads [B, H/tp, T, Dh]: heads are dim 1."""
    return SequenceParallel(sequence_dim=1, use_local_output=True)
