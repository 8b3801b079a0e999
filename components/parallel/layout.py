"""What a parallel plan says about how it lays a run out, without running it: the degrees
on some number of processes, the pipeline schedule, and which pipeline rank holds which
stages and layers (`tessera.components.parallel.pipeline`'s own placement, so the dry run
sizes the stages the run will build).

`ParallelPlan.layout(model, world_size=...)` answers with a `Layout`; `--dry-run` sizes
memory and communication from it (`tessera.components.train.memory_model`,
`tessera.components.train.comm_volume`).
"""

from __future__ import annotations

import dataclasses

from tessera.components.interfaces import DryRunError
from tessera.components.parallel import pipeline


def expert_parallel_fault(*, dp_replicate: int, dp_shard: int, ep: int) -> str | None:
    """Why `ep` cannot be carved out of these data-parallel degrees, or None.

    The one rule for the expert-parallel degree (the mesh checks it, a `Layout` refuses it):
    the routed experts are sharded over ep of the data-parallel processes, of dp_shard beside
    FSDP2 (torchtitan's layout) or, with dp_shard=1, of dp_replicate beside DDP / ZeRO-1
    (DeepSeek-V3's), so ep must divide that degree. Tensor-parallel ranks do not count: a
    tensor-parallel group routes the same tokens."""
    if ep == 1:
        return None
    over, name = (dp_shard, "dp_shard") if dp_shard > 1 else (dp_replicate, "dp_replicate")
    if over % ep == 0:
        return None
    return (f"ep={ep} must divide {name}={over} (the experts are sharded over ep of the data-parallel processes: of "
            f"dp_shard beside FSDP2, else of dp_replicate); set parallel.{name} to a multiple of {ep}, or "
            f"parallel.ep to a divisor of {over}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """A run's parallel layout: `dp_replicate` x `dp_shard` x `tp` x `pp` processes, `ep` carved
    out of the data-parallel ones (see `expert_parallel_fault`; the degrees as
    `tessera.components.parallel.mesh.Mesh` documents them).

    zero1: optimizer state sharded over the replicas (ZeRO-1; dp_shard=1).
    reshard_after_forward: FSDP frees each block's gathered parameters after its forward.
    schedule: the pipeline schedule (one of `pipeline.SCHEDULES`, any spelling
        `pipeline.schedule_name` takes; stored canonical), used when pp > 1.
    virtual_stages: stages per rank for Interleaved1F1B.
    n_microbatches: the schedule's own micro-batches per step (None: the trainer's).

    Raises ValueError for a degree below 1, an unknown schedule or an ep the data-parallel
    degrees cannot give.
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero1: bool = False
    reshard_after_forward: bool = True
    schedule: str = "1F1B"
    virtual_stages: int = 1
    n_microbatches: int | None = None

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "virtual_stages"):
            if getattr(self, name) < 1:
                raise DryRunError(f"layout: {name}={getattr(self, name)} must be >= 1")
        fault = expert_parallel_fault(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, ep=self.ep)
        if fault:
            raise DryRunError(f"layout: {fault}")
        object.__setattr__(self, "schedule", pipeline.schedule_name(self.schedule))

    @property
    def dp(self) -> int:
        """Data-parallel processes (each trains on its own share of the batch)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        """Processes the layout takes."""
        return self.dp * self.tp * self.pp

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pipeline rank holds (`pipeline.stages_per_rank`)."""
        return pipeline.stages_per_rank(self.schedule, self.virtual_stages)

    @property
    def expert_dp(self) -> int:
        """Data-parallel processes holding copies of the same routed experts."""
        return self.dp // self.ep

    @property
    def expert_shard(self) -> int:
        """Processes FSDP shards each routed expert over. ep = 1: the experts are parameters
        of their block's FSDP unit like the rest, sharded over dp_shard (tensor parallelism
        does not split routed experts: every tp rank runs all of them). ep > 1: none; each
        expert lives whole on its owner and its `expert_dp` copies average their gradients
        (`tessera.components.moe.expert_parallel`), where torchtitan would shard it further."""
        return self.dp_shard if self.ep == 1 else 1

    def stage_owners(self) -> list[int]:
        """The pipeline rank of each stage, by stage index (a loop, or DualPipeV's V)."""
        if self.pp == 1:
            return [0]
        n_stages = self.pp * self.stages_per_rank
        owner = [0] * n_stages
        for rank in range(self.pp):
            for stage in pipeline.local_stage_indices(rank, self.pp, n_stages, self.schedule):
                owner[stage] = rank
        return owner

    def rank_stages(self, n_layers: int) -> list[list[tuple[int, ...]]]:
        """Per pipeline rank, the main-layer indices of each stage it holds, its stages in
        increasing order (the order `pipeline.split_stages` builds them in). ValueError when a
        stage would hold no layer."""
        if self.pp == 1:
            return [[tuple(range(n_layers))]]
        specs = pipeline.stage_layout(n_layers, self.pp * self.stages_per_rank)
        owner = self.stage_owners()
        return [[spec.layers for spec in specs if owner[spec.index] == rank] for rank in range(self.pp)]

    def holds_first(self, rank: int) -> bool:
        """Whether pipeline rank `rank` holds the first stage (the embedding)."""
        return self.stage_owners()[0] == rank

    def holds_last(self, rank: int) -> bool:
        """Whether pipeline rank `rank` holds the last stage (final norm, head, MTP modules; the
        loss): the last rank, or rank 0 under DualPipeV (the V turns back to it)."""
        return self.stage_owners()[-1] == rank
