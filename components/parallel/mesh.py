"""One parallel plan for every layout: the processes form an N-D device mesh whose degrees
say how the model and the batch are split.

    torchrun --nproc-per-node 4 recipes/llama_pretrain.py debug parallel=@mesh(dp_replicate=2,dp_shard=2)

The degrees' product must equal the number of processes. The data-parallel layout follows
from the two data-parallel degrees:

    dp_replicate  dp_shard  layout
    1             1         one process (or a plain replica group of one)
    N             1         DDP (optionally ZeRO-1, a communication hook, or a periodic sync)
    1             N         FSDP2 (every process holds 1/N of each parameter)
    R             S         HSDP: FSDP2 sharded over S processes, replicated R times

Model parallelism splits the model on top of that:

    tp  heads, MLP widths and vocabulary over tp ranks (alone, under FSDP2, with pp)
    pp  layers into pipeline stages (with any data-parallel layout above, tp and ep)
    ep  routed experts over ep of the data-parallel processes: of dp_shard beside FSDP2
        (torchtitan's layout), or of dp_replicate beside DDP / ZeRO-1 (DeepSeek-V3's:
        @mesh(dp_replicate=128, pp=16, ep=64, zero1=True) on 2,048 GPUs)

For example `@mesh(pp=2, dp_shard=2)` is FSDP x PP on 4 processes, `@mesh(dp_shard=2, tp=2,
pp=2)` FSDP x TP x PP on 8, and `@mesh(pp=2, dp_replicate=2, ep=2, zero1=True)` V3's plan in
miniature.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from tessera.components.interfaces import CommHook, DataShare, ParallelPlan, PeriodicSync, PrecisionPolicy
from tessera.components.moe import expert_parallel
from tessera.components.moe.router import set_load_group
from tessera.components.parallel import ddp, diloco, pipeline, rank_state, sharding, tensor_parallel
from tessera.components.parallel.layout import Layout, expert_parallel_fault
from tessera.components.parallel.process_group import ensure_process_group, world
from tessera.registry.invariants import invariant
from tessera.registry.kinds import PARALLEL_PLAN


class MeshError(ValueError):
    """A parallel plan that cannot run on this many processes (raised before any process
    group is created)."""


@invariant("dp_replicate >= 1 and (dp_shard >= 1 or dp_shard == -1)",
           lambda dp_replicate, dp_shard: dp_replicate >= 1 and (dp_shard >= 1 or dp_shard == -1),
           fix="use degrees >= 1 (dp_shard=-1 means: every process the other degrees leave)")
@invariant("pp == 1 or (pp >= 1 and comm_hook is None and periodic_sync is None)",
           lambda pp, comm_hook, periodic_sync: pp == 1 or (pp >= 1 and comm_hook is None and periodic_sync is None),
           fix="pipeline stages compose with data (dp_replicate, dp_shard, zero1), tensor (tp) and expert (ep) "
               "parallelism; not with a comm_hook (the schedule runs the backward, not DDP) or a periodic_sync")
@invariant("tp == 1 or (tp >= 1 and dp_replicate == 1 and ep == 1 and not zero1 and periodic_sync is None)",
           lambda tp, dp_replicate, ep, zero1, periodic_sync:
           tp == 1 or (tp >= 1 and dp_replicate == 1 and ep == 1 and not zero1 and periodic_sync is None),
           fix="tensor parallelism runs alone, under FSDP2 or with pipeline stages: use @mesh(tp=T), "
               "@mesh(dp_shard=N,tp=T) or @mesh(dp_shard=N,tp=T,pp=P), without dp_replicate, ep, zero1 or "
               "periodic_sync")
@invariant("ep == 1 or (ep >= 1 and comm_hook is None and periodic_sync is None)",
           lambda ep, comm_hook, periodic_sync: ep == 1 or (ep >= 1 and comm_hook is None and periodic_sync is None),
           fix="expert parallelism shards the routed experts over ep of the data-parallel processes (of dp_shard "
               "beside FSDP2, e.g. @mesh(dp_shard=N,ep=E); of dp_replicate beside DDP or ZeRO-1, e.g. "
               "@mesh(dp_replicate=N,ep=E,zero1=True)); a comm_hook or periodic_sync would treat the experts as "
               "replicas: drop them")
@invariant("comm_hook needs DDP: dp_replicate > 1 and dp_shard == 1",
           lambda comm_hook, dp_replicate, dp_shard: comm_hook is None or (dp_replicate > 1 and dp_shard == 1),
           fix="a communication hook compresses DDP's gradient all-reduce across dp_replicate > 1 replicas; with "
               "dp_shard > 1 (FSDP/HSDP) FSDP2 reduce-scatters the gradients itself and a hook has nothing to "
               "compress; use dp_replicate=N,dp_shard=1 for a hook, or drop comm_hook")
@invariant("zero1 needs replicated parameters: dp_shard == 1", lambda zero1, dp_shard: not zero1 or dp_shard == 1,
           fix="dp_shard > 1 (FSDP/HSDP) already shards the optimizer state, with parameters and gradients too; "
               "drop zero1, or use dp_replicate=N,dp_shard=1 for ZeRO-1")
@invariant("periodic_sync needs replicated parameters: dp_shard == 1",
           lambda periodic_sync, dp_shard: periodic_sync is None or dp_shard == 1,
           fix="a periodic sync (local SGD, DiLoCo) averages whole replicas; use dp_replicate=N,dp_shard=1")
@invariant("periodic_sync excludes comm_hook and zero1",
           lambda periodic_sync, comm_hook, zero1: periodic_sync is None or (comm_hook is None and not zero1),
           fix="with a periodic sync every replica steps its own optimizer on its own gradients: there is no "
               "per-step gradient all-reduce to compress and no shared optimizer state to shard; drop "
               "comm_hook/zero1 or periodic_sync")
@PARALLEL_PLAN.register("mesh")
class Mesh(ParallelPlan):
    """The processes as a device mesh: `dp_replicate` replicas (DDP, optionally ZeRO-1, a
    gradient hook or a periodic sync) x `dp_shard` shards (FSDP2; both > 1: HSDP) x `tp` x
    `pp`, multiplying to the number of processes.

    `ep` is carved out of the data-parallel degrees; torchtitan's `ParallelDims` builds the
    mesh; the module docstring tabulates the layouts.

    Args:
        dp_replicate: replicas of the model (DDP; across nodes under HSDP).
        dp_shard: processes each parameter is sharded over (FSDP2); -1: all the processes
            the other degrees leave.
        tp: ranks each attention's heads, each MLP's hidden width and the vocabulary are split
            over (Megatron-style, with sequence-parallel norms and a vocab-parallel loss); alone,
            under FSDP2 (dp_shard) and with pp (stages exchange sequence shards).
        pp: pipeline stages: the first holds the embedding, the last the norm, head and MTP
            modules (DeepSeek-V3's placement). Composes with dp_replicate (the stages'
            gradients averaged after the schedule's backward), zero1, dp_shard (each stage an
            FSDP2 root), tp and ep.
        schedule, virtual_stages, n_microbatches: the pipeline schedule (GPipe, 1F1B,
            Interleaved1F1B with `virtual_stages` per rank, DualPipeV), and micro-batches per
            step (None: the trainer's micro-batches).
        ep: processes the routed experts are sharded over (all-to-all dispatch), carved out of
            dp_shard (FSDP2 shards the other parameters, torchtitan's layout) or, with
            dp_shard=1, out of dp_replicate (DDP or ZeRO-1 keep the others replicated).
        zero1: shard the optimizer state across the replicas (ZeRO-1; needs dp_shard=1); with
            ep, of the dense parameters (each process steps its own experts).
        comm_hook: how DDP communicates gradients (fp16, PowerSGD, 1-bit; needs dp_shard=1).
        periodic_sync: no per-step gradient averaging: each replica steps on its own and this
            synchronises the weights every so many steps (local SGD, DiLoCo; needs dp_shard=1).
        reshard_after_forward: FSDP2 frees the gathered parameters after each block's forward
            (ZeRO-3, least memory) or keeps them until the backward (less communication).
        reduce_dtype: dtype FSDP2 reduces gradients in (None: the parameters' dtype).

    Every process trains on a disjoint 1/(dp_replicate x dp_shard) share of each global
    batch (`batch_size` stays global), and gradients are averaged over all of them, so the
    run steps as one process with the whole batch would (up to summation order). Process 0
    logs, shows progress and writes files.
    """

    shard_alone = False
    """Shard with FSDP2 even in one process (the `fsdp` alias: its checkpoints and mixed
    precision keep the same form at every process count)."""

    def __init__(self, *, dp_replicate: int = 1, dp_shard: int = 1, tp: int = 1, pp: int = 1, ep: int = 1,
                 zero1: bool = False, comm_hook: CommHook | None = None, periodic_sync: PeriodicSync | None = None,
                 reshard_after_forward: bool = True, reduce_dtype: torch.dtype | None = None,
                 schedule: Literal["GPipe", "1F1B", "Interleaved1F1B", "DualPipeV"] = "1F1B", virtual_stages: int = 1,
                 n_microbatches: int | None = None):
        self.dp_replicate, self.dp_shard, self.tp, self.pp, self.ep = dp_replicate, dp_shard, tp, pp, ep
        self.zero1 = zero1
        self.comm_hook = comm_hook
        self.periodic_sync = periodic_sync
        self.reshard_after_forward = reshard_after_forward
        self.reduce_dtype = reduce_dtype
        self.schedule, self.virtual_stages, self.n_microbatches = schedule, virtual_stages, n_microbatches
        self._pipeline: Any = None  # the schedule runner under pp > 1
        self.dims: Any = None  # torchtitan's ParallelDims, once `apply` built the mesh
        self.group: Any = None  # the data-parallel process group
        self._share: DataShare | None = None  # this process's share of each batch, once `apply` built the mesh
        self._replica: tuple[nn.Module, torch.optim.Optimizer | None] | None = None  # under a periodic sync
        self._ddp: nn.Module | None = None
        self._sharded = False
        self._experts: set[nn.Parameter] = set()  # expert-parallel weights: DDP, FSDP and ZeRO-1 leave them alone

    # -- layout ----------------------------------------------------------------------------------
    def degrees(self, world_size: int) -> dict[str, int]:
        """The degrees on `world_size` processes (dp_shard=-1 resolved), or `MeshError` naming
        the constraint they break."""
        fixed = self.dp_replicate * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise MeshError(f"parallel=@mesh: dp_shard=-1 takes the processes the other degrees leave, but "
                                f"dp_replicate x tp x pp = {fixed} does not divide the {world_size} processes; "
                                f"launch a multiple of {fixed} processes or set the degrees explicitly")
            dp_shard = world_size // fixed
        shown = f"dp_replicate={self.dp_replicate} x dp_shard={dp_shard} x tp={self.tp} x pp={self.pp}"
        if fixed * dp_shard != world_size:
            raise MeshError(f"parallel=@mesh: the degrees multiply to {fixed * dp_shard} ({shown}) but the run has "
                            f"{world_size} process{'es' if world_size != 1 else ''} (WORLD_SIZE); launch "
                            f"`torchrun --nproc-per-node {fixed * dp_shard}` or change the degrees so their product "
                            f"is {world_size} (dp_shard=-1 takes whatever the others leave)")
        return dict(dp_replicate=self.dp_replicate, dp_shard=dp_shard, tp=self.tp, pp=self.pp, ep=self.ep)

    def apply(self, model: nn.Module, *, precision: PrecisionPolicy | None = None,
              device: str = "cpu") -> nn.Module:
        degrees = self.check(model, int(os.environ.get("WORLD_SIZE", "1")))  # before any process-group work
        ensure_process_group(device)
        self.dims = _parallel_dims(self._mesh_degrees(degrees), world()[1], torch.device(device).type)
        # The processes reading different data: the mesh's "batch" dims (dp_replicate x dp_shard,
        # within one pipeline and one tensor-parallel group). A tensor-parallel group or a
        # pipeline reads one share together.
        # With one data-parallel process the group is torchtitan's size-1 stand-in (never the
        # world: under tp or pp alone the world's processes hold different tensors).
        batch = self.dims.get_optional_mesh("batch", include_singleton_axes=True)
        self.group = batch.get_group()
        self._share = DataShare(batch.get_local_rank(), batch.size())
        if self.tp > 1:  # heads, hidden widths and vocabulary split over tp; norms sequence-parallel
            tensor_parallel.apply_tensor_parallel(model, self.dims.get_mesh("tp"))
            self._sharded = True  # DTensor weights: initialised full, then split, as one process would
        if self.pp > 1:  # this rank's stages (the model's own submodules, still on the meta device)
            model = pipeline.pipeline(model, pp_rank=self.dims.get_mesh("pp").get_local_rank(), pp_size=self.pp,
                                      virtual_stages=self.virtual_stages, schedule=self.schedule)
            if self.tp > 1:  # stages split over tp exchange their sequence shards
                for stage in model.stages:
                    stage.sequence_mesh = self.dims.get_mesh("tp")
        if self.tp > 1 or self.pp > 1:
            # the aux-free bias sums expert loads over the processes reading different data only:
            # a tensor-parallel group routes the same tokens, a pipeline's ranks other layers
            set_load_group(model, self.group)
        if self.ep > 1:  # before FSDP: the experts become Shard(0) DTensors on the ep mesh, FSDP/DDP skip them
            replicas = ["dp_replicate", "efsdp"] if self.dims.dp_replicate > 1 else ["efsdp"]
            expert_parallel.apply_expert_parallel(model, self.dims.get_mesh("ep"),
                                                  replica_mesh=self.dims.get_optional_mesh(replicas),
                                                  load_group=self.group)
            self._experts = expert_parallel.expert_parameters(model)
        if self._shards_dense(degrees):
            names = ["dp_replicate", "fsdp"] if self.dims.dp_replicate > 1 else ["fsdp"]
            # each pipeline stage is its own FSDP root: the schedule drives its gradient sync
            for unit in (model.stages if self.pp > 1 else [model]):
                sharding.shard(unit, self.dims.get_mesh(names), reshard_after_forward=self.reshard_after_forward,
                               param_dtype=precision.param_dtype if precision is not None else None,
                               reduce_dtype=self.reduce_dtype, ignored_params=self._experts or None)
            self._sharded = True
        if self.pp > 1:  # the schedule runs a step's forward and backward
            device_type = torch.device(device).type
            # the residual stream's dtype: the gathered or cast weights' (bf16_params), else the
            # parameters' own (fp32 masters under autocast keep an fp32 stream)
            stream = precision.param_dtype if precision is not None else None
            # imported here: torch's pipelining pulls in torch._dynamo, 0.3 s that runs without pp never use
            from tessera.components.parallel.pipeline_schedule import PipelineRunner

            self._pipeline = PipelineRunner(
                model=model, schedule=self.schedule, group=self.dims.get_mesh("pp").get_group(), device=device,
                n_microbatches=self.n_microbatches, activation_dtype=stream,
                compute_context=(lambda: precision.autocast(device_type)) if precision is not None else None,
                sequence_shards=self.tp)
        return model

    def check(self, model: nn.Module, world_size: int) -> dict[str, int]:
        """The degrees on `world_size` processes, after checking that `model` (on the meta
        device is enough) can be laid out by them; MeshError naming every constraint broken.
        Creates no process group: a plan for 2,048 GPUs can be checked on a laptop."""
        degrees = self.degrees(world_size)
        self._check_model(model, degrees)
        return degrees

    def layout(self, model: nn.Module, *, world_size: int) -> Layout:
        """The layout this plan gives `model`, after `check`: dp_shard=-1 takes what the other
        degrees leave of `world_size` processes; fixed degrees are laid out as given, whatever
        `world_size` is (a plan for 2,048 GPUs is sized on a laptop), and so is dp_shard=-1 on
        fewer processes than the fixed degrees need (as one shard). MeshError: `check`'s faults."""
        fixed = self.dp_replicate * self.tp * self.pp
        sized = world_size if self.dp_shard == -1 and world_size >= fixed else fixed * max(1, self.dp_shard)
        degrees = self.check(model, sized)
        return Layout(**degrees, zero1=self.zero1, reshard_after_forward=self.reshard_after_forward,
                      schedule=self.schedule, virtual_stages=self.virtual_stages, n_microbatches=self.n_microbatches)

    def _check_model(self, model: nn.Module, degrees: dict[str, int]) -> None:
        """MeshError with every reason `model` cannot take these degrees (before any process group)."""
        faults = []
        if self.ep > 1:
            faults += expert_parallel.expert_parallel_faults(model, self.ep)
            fault = expert_parallel_fault(dp_replicate=degrees["dp_replicate"], dp_shard=degrees["dp_shard"],
                                          ep=self.ep)
            faults += [fault] if fault else []
        if self.tp > 1:
            faults += tensor_parallel.tensor_parallel_faults(model, self.tp)
        if self.pp > 1:
            faults += pipeline.pipeline_faults(model, self.pp, self.virtual_stages, schedule=self.schedule,
                                               n_microbatches=self.n_microbatches)
        _refuse(faults)

    def _mesh_degrees(self, degrees: dict[str, int]) -> dict[str, int]:
        """The degrees torchtitan's `ParallelDims` builds the mesh from. It carves `ep` out of
        dp_shard (x tp); expert parallelism beside DDP or ZeRO-1 (dp_shard=1, DeepSeek-V3's
        layout) carves it out of dp_replicate instead, so the mesh is built as dp_replicate/ep
        replicas x ep "shards" whose dense parameters this plan then keeps replicated over all
        dp_replicate processes (DDP, ZeRO-1) rather than FSDP-sharding them."""
        if self.ep > 1 and degrees["dp_shard"] == 1:
            return {**degrees, "dp_replicate": degrees["dp_replicate"] // self.ep, "dp_shard": self.ep}
        return degrees

    def _shards_dense(self, degrees: dict[str, int]) -> bool:
        """Whether FSDP2 shards the dense parameters (dp_shard > 1, or the `fsdp` alias)."""
        return degrees["dp_shard"] > 1 or self.shard_alone

    def materialize(self, model: nn.Module, device: str) -> None:
        if self._pipeline is not None:  # the whole model initialised in one process's order, then this rank's stages
            pipeline.materialize_stages(model, device)
        elif self._sharded or self._experts:  # DTensor weights: full init in one process's order, keep the shard
            sharding.materialize_sharded(model, device)
        else:  # every replica draws the same weights from the same seed
            super().materialize(model, device)

    def ready(self, model: nn.Module) -> None:
        replicated = not self._sharded and self.periodic_sync is None and self._pipeline is None
        if replicated and dist.get_world_size(self.group) > 1:
            self._ddp = ddp.wrap(model, self.group, self.comm_hook, ignore=self._experts)
        if self.periodic_sync is not None:  # e.g. DiLoCo keeps the starting weights
            self.periodic_sync.begin(model, self.group)
            self._replica = (model, None)  # each replica's own weights and optimizer go in the checkpoint

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self._replica = (self._replica[0], optimizer) if self._replica is not None else None
        if not self.zero1 or dist.get_world_size(self.group) == 1:  # ZeRO-1 over one process: the optimizer
            return optimizer
        try:
            # imported here: torch.distributed.optim costs every process 0.3 s that only zero1 uses
            from tessera.components.parallel import zero

            return zero.shard_optimizer_state(optimizer, self.group, local=self._experts)
        except ValueError as err:  # an optimizer ZeRO-1 cannot rebuild: a message from every rank, no traceback
            raise MeshError(str(err)) from err

    def forward_backward(self, model: nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], *,
                         n_micro: int, losses: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                         backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
        if self._pipeline is not None:
            # the trainer's micro-batch count is known only now: refuse before the first step runs
            _refuse(pipeline.microbatch_faults(self.schedule, self.pp, self.virtual_stages,
                                               self.n_microbatches or n_micro))
            terms = self._pipeline.forward_backward(model, micro_batches, n_micro=n_micro)
            if not self._sharded and dist.get_world_size(self.group) > 1:  # replicated stages: DDP's average
                ddp.average_gradients((p for p in model.parameters() if p not in self._experts), self.group)
        elif self._ddp is None:
            terms = super().forward_backward(model, micro_batches, n_micro=n_micro, losses=losses, backward=backward)
        else:
            terms = ddp.forward_backward(self._ddp, micro_batches, n_micro=n_micro, losses=losses, backward=backward)
        if self._experts:  # each expert's copies average their step's gradients once
            expert_parallel.reduce_expert_gradients(model)
        return terms

    def gradient_norm_group(self) -> Any:
        return self.dims.get_mesh("pp").get_group() if self._pipeline is not None else None

    def validation_loss(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float | None:
        if self._pipeline is None:
            return None
        return self._pipeline.evaluate(batches).get("lm", 0.0)  # no batches: 0, as one process's mean of none

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if self.periodic_sync is not None:
            self.periodic_sync.after_step(model, step, self.group)

    def state_dict(self) -> dict[str, Any]:
        """The communication hook's and the periodic sync's state, each process's tensors
        as its row of a group-wide tensor (`tessera.components.parallel.rank_state`)."""
        parts = {"comm_hook": self.comm_hook, "periodic_sync": self.periodic_sync}
        state = {name: rank_state.stack_over_ranks(part.state_dict(), self.group)
                 for name, part in parts.items() if part is not None}
        if self._replica is not None and self._replica[1] is not None:
            state["replica"] = rank_state.stack_over_ranks(diloco.replica_state(*self._replica), self.group)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = {"comm_hook": self.comm_hook, "periodic_sync": self.periodic_sync}
        for name, part in parts.items():
            if part is not None and state.get(name):
                part.load_state_dict(rank_state.own_rows(state[name], self.group, what=f"parallel.{name} state"))
        if self._replica is not None and self._replica[1] is not None and state.get("replica"):
            diloco.load_replica_state(*self._replica, rank_state.own_rows(state["replica"], self.group,
                                                                          what="replicas' own weights"))

    @property
    def is_main_process(self) -> bool:
        return world()[0] == 0

    @property
    def data_parallel(self) -> DataShare:
        """The mesh's "batch" dims (dp_replicate x dp_shard): a tensor-parallel group or a
        pipeline reads one share together. Before `apply`: the default (every process)."""
        return self._share if self._share is not None else super().data_parallel


def _refuse(faults: list[str]) -> None:
    """MeshError listing `faults`, one per line (none: nothing to refuse)."""
    if faults:
        raise MeshError("parallel=@mesh:\n  " + ";\n  ".join(faults))


def _parallel_dims(degrees: dict[str, int], world_size: int, device_type: str) -> Any:
    """torchtitan's `ParallelDims` for `degrees`, its mesh built on `device_type`.

    Two things around it do not fit a library that trains on any device: `build_mesh` puts the
    mesh on torchtitan's import-time guess of the accelerator (`torchtitan.tools.utils.
    device_type`, "cuda" even on a machine without one) rather than the run's `device`, so
    it is pointed at the run's device while the mesh is built; and the degree-1 dims it
    creates use torch's "fake" process-group backend, which only torch's testing package
    registers, so that is imported first.
    """
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers the "fake" backend
    from torchtitan.distributed import parallel_dims

    dims = parallel_dims.ParallelDims(dp_replicate=degrees["dp_replicate"], dp_shard=degrees["dp_shard"], cp=1,
                                      tp=degrees["tp"], pp=degrees["pp"], ep=degrees["ep"], world_size=world_size,
                                      # plain DTensor meshes: FSDP2's (replicate, shard) for HSDP
                                      spmd_backend="partial_dtensor")
    with _module_attribute(parallel_dims, "device_type", device_type):
        dims.build_mesh()
    return dims


@contextlib.contextmanager
def _module_attribute(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)
