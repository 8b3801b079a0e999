"""Setting a run up: everything between the config and the first step.

In order (the order fixes the random draws, so one seed gives one run): torch threads, the
seed, the precision policy (`auto` resolved for this machine), the parallel plan's layout of
the model (still on the meta device), the data's share of every batch, the weights
materialised and initialised as one process would (then, with `init.from_hf`, replaced by a
transformers checkpoint's, each process reading its shard), the precision policy's conversion, the
compute switches (activation checkpointing, compilation), and the optimizer over the
model's parameter groups, wrapped by the plan and the precision policy. With
`step.micro_batch_size="auto"` the planner sizes the candidates before the plan lays the model
out, and trial steps confirm one once the optimizer is built (`auto_micro_batch`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
from rich.console import Console

from tessera.components.interfaces import (
    DataShare,
    OptimizerFactory,
    ParallelPlan,
    PrecisionPolicy,
    PreparedData,
    ReportsExpertLoad,
    SecondOrderOptimizer,
    ShardedData,
    TrainingData,
)
from tessera.components.model.decoder import DecoderLM
from tessera.components.model.stats import training_flops_per_token
from tessera.components.optim.param_groups import decay_groups
from tessera.components.parallel.process_group import world
from tessera.components.parallel.single import SingleProcess
from tessera.components.precision import auto
from tessera.components.precision.master_weights import MasterWeights
from tessera.components.train import auto_micro_batch
from tessera.components.train.compute import Compute
from tessera.components.train.init_options import InitOptions
from tessera.components.train.metrics import moe_layer_indices
from tessera.components.train.step_options import StepOptions


@dataclasses.dataclass(kw_only=True)
class Assembled:
    """A run ready for its first step."""

    model: DecoderLM
    """The module to train, as the plan laid it out (possibly wrapped, sharded or staged)."""
    parallel: ParallelPlan
    precision: PrecisionPolicy
    precision_note: str
    """What `auto` chose and why (or the policy's name): the run's first line."""
    optimizer: torch.optim.Optimizer
    """What the run steps: the optimizer wrapped by the plan and the precision policy."""
    raw_optimizer: torch.optim.Optimizer
    """The optimizer as built over the parameter groups (its capabilities decide second-order passes)."""
    data_parallel: DataShare
    micro_batch_size: int
    """Sequences per forward/backward on each process (resolved from `StepOptions`)."""
    flops_per_token: float
    """Training FLOPs per token of the whole model (before a plan splits it)."""
    moe_layers: list[int]
    """The layer index of each MoE layer of the whole model, in the order expert loads are logged."""
    processes: int


def assemble(*, model: DecoderLM, data: TrainingData, optimizer: OptimizerFactory, parallel: ParallelPlan | None,
             precision: PrecisionPolicy | None, batch_size: int, seq_len: int, seed: int, device: str,
             step: StepOptions, compute: Compute, announce: bool, init: InitOptions | None = None) -> Assembled:
    """Set the run up (see the module docstring for the order). `model` may be on the meta
    device or already materialised; `announce`: print the precision note on the main process.
    Raises ValueError for a batch that does not split into whole micro-batches, or an
    optimizer the layout cannot serve. `init.from_hf`: the checkpoint whose weights replace the
    initialisation, each process reading its own shard."""
    compute.set_up_process()
    torch.manual_seed(seed)
    precision, precision_note = auto.resolve(precision or auto.Auto(), device)
    parallel = parallel if parallel is not None else SingleProcess()
    # Counted on the whole model, before a plan splits it into stages or shards.
    flops_per_token = training_flops_per_token(model, seq_len)
    moe_layers = moe_layer_indices(model, ReportsExpertLoad)
    sized = step.micro_batch_size == "auto"
    planned = auto_micro_batch.plan(model, parallel=parallel, precision=precision, optimizer=optimizer,
                                    batch_size=batch_size, seq_len=seq_len, device=device,
                                    checkpointing=compute.activation_checkpointing,
                                    memory_limit=step.memory_limit) if sized else None
    model = parallel.apply(model, precision=precision, device=device)
    rank, processes = world()
    share = parallel.data_parallel  # processes reading different data (tp / pp groups share theirs)
    if announce and parallel.is_main_process:
        Console().print(f"precision: {precision_note}", highlight=False, soft_wrap=True)
    micro_batch_size = _micro_batch_size(None if sized else step.micro_batch_size, batch_size, share.size)
    if isinstance(data, ShardedData):
        data.read_share(share)
    if processes > 1 and isinstance(data, PreparedData):
        _prepare_once(data, rank)
    if any(p.is_meta for p in model.parameters()):
        parallel.materialize(model, device)
    if init is not None and init.from_hf is not None:  # before any cast: fp32 weights, then the policy's dtype
        _load_from_hf(model, init.from_hf, announce=announce and parallel.is_main_process)
    model = precision.prepare(model)
    compute.apply(model)
    parallel.ready(model)
    raw_optimizer = optimizer(decay_groups(model, decay_embeddings=step.decay_embeddings,
                                           decay_vectors=step.decay_norms_and_biases))
    wrapped = precision.wrap_optimizer(parallel.wrap_optimizer(raw_optimizer))
    _refuse_second_order(raw_optimizer, wrapped, processes)
    if planned is not None:  # weights, optimizer and data ready: the trial steps run as the run's steps will
        choice = auto_micro_batch.choose(planned, model, parallel=parallel, precision=precision, optimizer=optimizer,
                                         data=data, share=micro_batch_size, seq_len=seq_len, device=device)
        micro_batch_size = choice.size
        if announce and parallel.is_main_process:
            Console().print(choice.note, highlight=False, soft_wrap=True)
    return Assembled(model=model, parallel=parallel, precision=precision, precision_note=precision_note,
                     optimizer=wrapped, raw_optimizer=raw_optimizer, data_parallel=share,
                     micro_batch_size=micro_batch_size, flops_per_token=flops_per_token, moe_layers=moe_layers,
                     processes=processes)


def _load_from_hf(model: torch.nn.Module, folder: str, *, announce: bool) -> None:
    """Each process reads its own shard of every weight from the checkpoint in `folder`."""
    from tessera.components.families.hf_checkpoint import load_into, read_config

    hf = read_config(folder)
    read = load_into(model, folder)
    if announce:
        Console().print(f"init: weights from {folder} ({', '.join(hf.get('architectures') or [hf['model_type']])}; "
                        f"{read:,} values read by this process)", highlight=False, soft_wrap=True)


def _micro_batch_size(asked: int | None, batch_size: int, data_parallel_size: int) -> int:
    """Sequences per forward on each process: `asked`, or each process's whole share (which
    `auto` then divides); a ValueError when `batch_size` is not a whole number of
    micro-batches on every process."""
    micro_batch_size = asked or max(1, batch_size // data_parallel_size)
    if batch_size % (micro_batch_size * data_parallel_size):
        raise ValueError(f"batch_size={batch_size} is not a whole number of micro-batches of {micro_batch_size} "
                         f"sequences on each of {data_parallel_size} data-parallel processes; choose batch_size a "
                         f"multiple of step.micro_batch_size x data-parallel processes "
                         f"({micro_batch_size * data_parallel_size})")
    return micro_batch_size


def _refuse_second_order(raw: torch.optim.Optimizer, wrapped: torch.optim.Optimizer, processes: int) -> None:
    """A ValueError for an optimizer that differentiates the gradients where they are sharded
    or cast (what it would differentiate is not the gradient it was given)."""
    if isinstance(raw, SecondOrderOptimizer) and (isinstance(wrapped, MasterWeights) or processes > 1):
        raise ValueError("optimizer: this optimizer differentiates the gradients a second time (Hessian-vector "
                         "products), which sharded data-parallel gradients and bf16_params' fp32 master copies do "
                         "not carry; use it with parallel=@single and precision=@fp32 or @bf16, or use "
                         "optimizer=@sophia (its Gauss-Newton-Bartlett estimate needs no second derivative)")


def _prepare_once(data: PreparedData, rank: int) -> None:
    """Prepare (clean, dedup, tokenize) the data once per node, on its first process (LOCAL_RANK
    0): nodes need not share the data folder, and where they do, the preparation lock makes a
    later node wait for the first and load its copy. The node's other processes wait for its
    cache instead of racing to write the same folder. They poll rather than wait in a
    collective, whose timeout a large corpus would outlast (if the preparer fails, torchrun stops them)."""
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:  # not rank 0 alone: another node's data folder may be its own
        data.prepare()
        return
    while not data.prepared():
        time.sleep(1.0)
    data.prepare()
