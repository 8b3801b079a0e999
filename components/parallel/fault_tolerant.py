"""Replica-level fault tolerance with torchft: each replica group is its own torchrun job that
shards the model with FSDP2, and torchft's `Manager` owns the replicate dimension.

    torchft_lighthouse --min_replicas 1 --join_timeout_ms 10000 &
    REPLICA_GROUP_ID=0 torchrun --nproc-per-node 2 recipes/llama_pretrain.py debug parallel=@torchft(dp_shard=2)
    REPLICA_GROUP_ID=1 torchrun --nproc-per-node 2 --master-port 29600 recipes/llama_pretrain.py debug \
        parallel=@torchft(dp_shard=2)

At the start of every step the group asks the lighthouse for the quorum of live groups. After
FSDP2's reduce-scatter inside the group, FSDP2's all-reduce hook averages each sharded gradient
over the groups in the quorum (torchft's fault-tolerant all-reduce), and the optimizer steps
only when the quorum commits. A group that dies is dropped from the next quorum; one that
(re)joins receives the live state from a healthy group before its first step: the model's and
optimizer's shards (each group rank from the same rank of the source group) and the run's own
progress (step, tokens, loss history, RNG, data position), handed over by the trainer through
`ParallelPlan.share_run_state`. Without faults the steps are `@mesh(dp_replicate=R, dp_shard=S)`'s
(HSDP), up to summation order.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from tessera.components.interfaces import DataShare, PrecisionPolicy
from tessera.components.parallel.layout import Layout
from tessera.components.parallel.mesh import Mesh, MeshError
from tessera.components.parallel.process_group import world
from tessera.registry.invariants import invariant
from tessera.registry.kinds import PARALLEL_PLAN

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
REPLICA_ENV = "REPLICA_GROUP_ID"


@invariant("replica_groups >= 1 and 1 <= min_replicas <= replica_groups",
           lambda replica_groups, min_replicas: replica_groups >= 1 and 1 <= min_replicas <= replica_groups,
           fix="use replica_groups >= 1 and min_replicas between 1 and replica_groups")
@invariant("timeout > 0 and quorum_timeout > 0", lambda timeout, quorum_timeout: timeout > 0 and quorum_timeout > 0,
           fix="use positive timeouts (seconds)")
@PARALLEL_PLAN.register("torchft")
class FaultTolerant(Mesh):
    """One replica group of a fault-tolerant HSDP run: this job's processes shard the model with
    FSDP2 over `dp_shard` (as `@mesh(dp_shard=S)`; sharded even on one process), and torchft
    averages the gradients over the live replica groups and gates each optimizer step on the
    quorum committing it.

    Args:
        dp_shard: processes of this job each parameter is sharded over (-1: all of them).
        replica_groups: how many replica groups the data is split into: group g reads shares
            g*S .. g*S+S-1 of R*S of every batch (`batch_size` stays the global batch of all R
            groups; while a group is down its share is not read).
        replica_id: this group's index, 0 .. replica_groups-1 (None: from REPLICA_GROUP_ID).
        lighthouse: the lighthouse address, e.g. "http://host:29510" (None: TORCHFT_LIGHTHOUSE).
        min_replicas: replica groups a step needs to commit (fewer: the step is not applied).
        timeout: seconds for the cross-group all-reduce, commit and state transfer.
        quorum_timeout: seconds a step waits for the lighthouse's quorum.
        reshard_after_forward, reduce_dtype: FSDP2's, as in `@mesh`.
    """

    shard_alone = True  # FSDP2 even on one process: its all-reduce hook is where torchft averages

    def __init__(self, *, dp_shard: int = -1, replica_groups: int = 2, replica_id: int | None = None,
                 lighthouse: str | None = None, min_replicas: int = 1, timeout: float = 60.0,
                 quorum_timeout: float = 60.0, reshard_after_forward: bool = True,
                 reduce_dtype: torch.dtype | None = None):
        super().__init__(dp_shard=dp_shard, reshard_after_forward=reshard_after_forward, reduce_dtype=reduce_dtype)
        self.replica_groups, self.replica_id, self.lighthouse = replica_groups, replica_id, lighthouse
        self.min_replicas, self.timeout, self.quorum_timeout = min_replicas, timeout, quorum_timeout
        self.manager: Any = None  # torchft's Manager, once `apply` made it
        self._optimizer: torch.optim.Optimizer | None = None  # the raw optimizer, whose state a joiner receives
        self._participants = -1  # the last quorum's size, to log changes
        self._uncommitted: list[int] = []  # steps the quorum did not commit

    # -- set-up ----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, precision: PrecisionPolicy | None = None,
              device: str = "cpu") -> nn.Module:
        """FSDP2 over this job's processes, this group's data share, and torchft's manager."""
        torchft = _import_torchft()
        replica, lighthouse = self._replica_index(), self._lighthouse_address()
        model = super().apply(model, precision=precision, device=device)
        inner = self._share  # this process's share inside its group
        self._share = DataShare(replica * inner.size + inner.rank, self.replica_groups * inner.size)
        rank, size = world()
        timeout = timedelta(seconds=self.timeout)
        # use_async_quorum=False: the quorum (and a joiner's state transfer) completes at the start
        # of the step, while the run's counters are whole; init_sync=False: every group draws the
        # same initial weights from the seed, so step 0 needs no transfer.
        self.manager = torchft.manager.Manager(
            pg=torchft.process_group.ProcessGroupGloo(timeout=timeout), load_state_dict=None, state_dict=None,
            min_replica_size=self.min_replicas, use_async_quorum=False, timeout=timeout,
            quorum_timeout=timedelta(seconds=self.quorum_timeout), connect_timeout=timeout, rank=rank,
            world_size=size, lighthouse_addr=lighthouse, replica_id=f"tessera_replica_{replica}", init_sync=False)
        atexit.register(self.manager.shutdown, wait=False)
        self.manager.register_state_dict_fn("model", lambda state: _load_local(model, state),
                                            lambda: _local_tree(model.state_dict()))
        self._say(f"parallel: fault tolerant (torchft): replica group {replica} of {self.replica_groups}, "
                  f"lighthouse {lighthouse}, {inner.size} process{'es' if inner.size != 1 else ''} sharding (FSDP2), "
                  f"steps commit with >= {self.min_replicas} group{'s' if self.min_replicas != 1 else ''}")
        return model

    def layout(self, model: nn.Module, *, world_size: int) -> Layout:
        """This group's FSDP2 layout, the replica groups as its replicate degree."""
        inner = super().layout(model, world_size=world_size)
        return Layout(dp_replicate=self.replica_groups, dp_shard=inner.dp_shard, tp=1, pp=1, ep=1,
                      reshard_after_forward=self.reshard_after_forward)

    def ready(self, model: nn.Module) -> None:
        """After FSDP2's reduce-scatter, each unit's gradient shard is averaged over the groups."""
        super().ready(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_all_reduce_hook(self._average_over_groups)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """torchft's commit gate around the optimizer; its state joins what a joiner receives."""
        self._optimizer = optimizer
        self.manager.register_state_dict_fn("optimizer", lambda state: _load_optimizer(optimizer, state),
                                            lambda: _local_tree(optimizer.state_dict()))
        return _commit_gate(self.manager, optimizer, self._uncommitted)

    def share_run_state(self, state_dict: Callable[[], dict[str, Any]],
                        load_state_dict: Callable[[dict[str, Any]], None]) -> None:
        """The run's progress travels with the weights; a resumed run's step is the manager's."""
        def load(state: dict[str, Any]) -> None:
            load_state_dict(state)
            self._say(f"torchft: joined at step {state['step']} with the live state of a healthy replica group")

        self.manager.register_state_dict_fn("run", load, state_dict)
        step = state_dict()["step"]
        self.manager.load_state_dict({"step": step, "batches_committed": step * self.replica_groups})

    # -- each step -------------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], *,
                         n_micro: int, losses: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                         backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
        """The step's quorum first (a joiner receives the live state here), then FSDP2's passes."""
        self.manager.start_quorum()
        self._log_quorum()
        return super().forward_backward(model, micro_batches, n_micro=n_micro, losses=losses, backward=backward)

    def mean_over_data_parallel(self, values: dict[str, float], device: str) -> dict[str, float]:
        """The group's mean, then the mean over the groups in the quorum."""
        inside = super().mean_over_data_parallel(values, device)
        names = sorted(inside)
        total = torch.tensor([inside[n] for n in names], dtype=torch.float64)
        self.manager.allreduce(total).wait()
        return dict(zip(names, total.tolist(), strict=True))

    def _average_over_groups(self, gradient: torch.Tensor) -> None:
        """FSDP2's all-reduce hook: `gradient` (this rank's flat reduce-scattered shard) becomes
        its mean over the quorum's groups, in place."""
        self.manager.allreduce(gradient).wait()

    # -- options and logging ---------------------------------------------------------------------
    def _replica_index(self) -> int:
        """This group's index from the option or REPLICA_GROUP_ID; MeshError when missing or out of range."""
        text = str(self.replica_id) if self.replica_id is not None else os.environ.get(REPLICA_ENV)
        if text is None or not text.isdigit() or int(text) >= self.replica_groups:
            raise MeshError(f"parallel=@torchft: replica_id is {text!r}; give each replica group's job its index "
                            f"0..{self.replica_groups - 1} as {REPLICA_ENV}=G or parallel=@torchft(replica_id=G), "
                            f"and replica_groups=R the number of groups")
        return int(text)

    def _lighthouse_address(self) -> str:
        """The lighthouse address from the option or TORCHFT_LIGHTHOUSE; MeshError when neither says."""
        address = self.lighthouse or os.environ.get(LIGHTHOUSE_ENV)
        if not address:
            raise MeshError(f"parallel=@torchft: no lighthouse; start one (torchft_lighthouse --min_replicas 1) and "
                            f"set {LIGHTHOUSE_ENV}=http://HOST:29510 or parallel=@torchft(lighthouse=...)")
        return address

    def _log_quorum(self) -> None:
        """One line whenever the number of groups in the quorum changes or a step was not committed."""
        step = self.manager.current_step()
        while self._uncommitted:
            self._say(f"torchft: step {self._uncommitted.pop(0)} was not committed (a group failed or too few "
                      f"groups): the weights did not change")
        participants = self.manager.num_participants()
        if participants != self._participants:
            self._say(f"torchft: step {step}: quorum of {participants} of {self.replica_groups} replica groups")
            self._participants = participants

    def _say(self, line: str) -> None:
        if self.is_main_process:
            Console().print(line, highlight=False, soft_wrap=True)


def _import_torchft() -> Any:
    """The torchft package, or MeshError saying how to install it. Its Rust side logs every
    quorum and commit at INFO, which would bury the run's own log: warnings only, unless
    RUST_LOG says otherwise."""
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        import torchft.manager
        import torchft.process_group
    except ImportError:
        raise MeshError('parallel=@torchft needs torchft: pip install -e ".[ft]" (or pip install torchft)') from None
    return torchft


def _commit_gate(manager: Any, optimizer: torch.optim.Optimizer, uncommitted: list[int]) -> torch.optim.Optimizer:
    """torchft's `OptimizerWrapper` (steps only when the quorum commits), minus its quorum at
    `zero_grad`: the plan starts each step's quorum when the step begins, while the run's
    counters are whole. A step the quorum did not commit is added to `uncommitted`."""
    from torchft.optim import OptimizerWrapper

    class CommitGate(OptimizerWrapper):
        def zero_grad(self, set_to_none: bool = True) -> None:
            self.optim.zero_grad(set_to_none)

        def step(self, closure: object | None = None) -> None:
            step = self.manager.current_step()
            if self.manager.should_commit():
                self.optim.step()
            else:
                uncommitted.append(step)

    return CommitGate(manager, optimizer)


def _local_tree(tree: Any) -> Any:
    """`tree` with every DTensor replaced by this rank's shard (what travels between groups:
    a rank receives from the same rank of the source group, which holds the same shard)."""
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {key: _local_tree(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_local_tree(value) for value in tree)
    return tree


@torch.no_grad()
def _load_local(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy received shards (`_local_tree` of a model's state dict) into `model`'s own."""
    for name, target in model.state_dict().items():
        (target.to_local() if isinstance(target, DTensor) else target).copy_(state[name])


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a received optimizer state dict, each shard made a DTensor like its parameter again."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in state["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # not the scalar step count
                    entries[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                      shape=param.shape, stride=param.stride())
    optimizer.load_state_dict(state)
