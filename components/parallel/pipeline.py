"""Pipeline parallelism, part 1: a `DecoderLM` cut into stages by layer count.

The first stage holds the embedding (with any absolute position table and the embedding
dropout), the last the final norm, the head and the multi-token prediction modules, as
DeepSeek-V3 places them (arXiv:2412.19437 §3.2.1: the embedding and the output head share
the edge stages); every stage in between holds only consecutive main layers. With MTP, the
first stage also passes the raw token embeddings down the pipeline, so the last stage's MTP
modules read the embedding without holding a copy of it (V3 shares it between the main model
and MTP): one more [B, T, D] activation per hop instead of a tied weight whose gradient two
ranks would have to sum.

A stage module is a `DecoderLM` holding the very submodules of the model it was cut from (no
copies; what it does not hold is None), so it runs the decoder's own `hidden_states` and
`losses` on its part. Its parameter names are the model's (`layers.3.attention...`), so a
model built on the meta device is cut first and materialised afterwards in exactly the
single-process order (`materialize_stages`), and checkpoints of a pipelined run name the
same tensors as a single-process run's.

Stages are placed on the `pp` ranks as the schedule wants them: one per rank (GPipe, 1F1B),
`virtual_stages` per rank in a loop (interleaved 1F1B: rank r holds stages r, r+p, ...), or
two per rank in a V (DualPipeV: rank r holds stages r and 2p-1-r, so rank 0 holds both the
embedding and the head). Running them is `tessera.components.parallel.pipeline_schedule`'s job.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from tessera.components.model.decoder import DecoderLM

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "DualPipeV")
"""The schedules of `torch.distributed.pipelining` a pipelined run can use (names as torch's
`get_schedule_class` takes them, case-insensitive)."""


def schedule_name(schedule: str) -> str:
    """The canonical spelling of `schedule` (one of `SCHEDULES`, any case, underscores
    ignored: "interleaved_1f1b" is "Interleaved1F1B"), or ValueError."""
    for name in SCHEDULES:
        if name.lower() == schedule.lower().replace("_", ""):
            return name
    raise ValueError(f"pipeline schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    """How many stages each rank holds under `schedule`: 1 for GPipe and 1F1B, 2 for
    DualPipeV (its V), `virtual_stages` for interleaved 1F1B."""
    name = schedule_name(schedule)
    return {"GPipe": 1, "1F1B": 1, "DualPipeV": 2}.get(name, virtual_stages)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its index among `n_stages`, the main layers it runs (indices into
    `model.layers`), and whether it holds the embedding (first) or norm/head/MTP (last)."""

    index: int
    n_stages: int
    layers: tuple[int, ...]

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


def stage_layout(n_layers: int, n_stages: int, *, input_weight: int = 0, output_weight: int = 0) -> list[StageSpec]:
    """Consecutive main layers per stage, as even as the count allows (earlier stages take
    the remainder), computed by torchtitan's `_generate_llm_fqn_per_model_part`.

    `input_weight` / `output_weight` count the embedding / the norm, head and MTP modules as
    that many layers when balancing (0: split by layer count alone; DeepSeek-V3's MTP makes
    the last stage heavier, which an `output_weight` of 1-2 evens out). Raises ValueError when
    some stage would hold no layer (see `pipeline_faults` for the message a config gets)."""
    from torchtitan.distributed.pipeline_parallel import _generate_llm_fqn_per_model_part

    names = _generate_llm_fqn_per_model_part(n_stages, n_layers, input_weight, output_weight)
    specs = [StageSpec(index=i, n_stages=n_stages,
                       layers=tuple(int(n.split(".")[1]) for n in stage if n.startswith("layers.")))
             for i, stage in enumerate(names)]
    if any(not spec.layers for spec in specs):
        raise ValueError(f"{n_stages} pipeline stages over {n_layers} layers (input_weight={input_weight}, "
                         f"output_weight={output_weight}) leave a stage without a layer")
    return specs


def local_stage_indices(pp_rank: int, pp_size: int, n_stages: int, schedule: str) -> tuple[int, ...]:
    """The stages rank `pp_rank` of `pp_size` holds under `schedule` (torchtitan's
    `_get_pp_rank_to_stage_indices_mapping`: a loop for GPipe/1F1B/interleaved, a V for DualPipeV)."""
    from torchtitan.distributed.pipeline_parallel import _get_pp_rank_to_stage_indices_mapping

    return tuple(_get_pp_rank_to_stage_indices_mapping(pp_rank, pp_size, schedule_name(schedule), n_stages))


def pipeline_faults(model: DecoderLM, pp: int, virtual_stages: int = 1, *, schedule: str = "1F1B",
                    n_microbatches: int | None = None, input_weight: int = 0, output_weight: int = 0) -> list[str]:
    """Every reason `model` cannot be pipelined over `pp` ranks with `virtual_stages` stages
    per rank under `schedule` (and `n_microbatches` micro-batches per step, when given), each
    naming the constraint and the fix; empty when it can. Works on a model on the meta device;
    a model that is not a DecoderLM gets one fault saying so (stages are cut by its names)."""
    faults = []
    try:
        name = schedule_name(schedule)
    except ValueError as error:
        return [f"{error}; pick one of them (e.g. schedule='1F1B')"]
    if pp < 1 or virtual_stages < 1:
        return [f"pp={pp} and virtual_stages={virtual_stages} must be >= 1"]
    if pp * stages_per_rank(name, virtual_stages) > 1 and not isinstance(model, DecoderLM):
        return [f"model is a {type(model).__name__}, not a DecoderLM: pipeline stages are cut from a DecoderLM's "
                f"embedding, layers, norm and head by their names; build the model as a DecoderLM "
                f"(tessera.components.model.decoder) or use pp=1"]
    per_rank = stages_per_rank(name, virtual_stages)
    if name in ("GPipe", "1F1B") and virtual_stages != 1:
        faults.append(f"schedule {name} runs one stage per rank but virtual_stages={virtual_stages}; use "
                      f"schedule='Interleaved1F1B' for several stages per rank, or virtual_stages=1")
    if name == "DualPipeV" and virtual_stages not in (1, 2):
        faults.append(f"schedule DualPipeV runs exactly 2 stages per rank (a V) but virtual_stages={virtual_stages}; "
                      f"set virtual_stages=2 (or leave it at 1: DualPipeV takes 2 anyway)")
    n_stages = pp * per_rank
    n_layers = len(model.layers)
    if n_stages > 1 and n_stages > n_layers:
        # name where the stages per rank come from: the V of DualPipeV surprises at 2 x pp
        why = {"DualPipeV": "schedule DualPipeV's V puts 2 stages on each rank",
               "Interleaved1F1B": f"schedule Interleaved1F1B puts virtual_stages={virtual_stages} on each rank"}
        most = max(1, n_layers // per_rank)
        faults.append(f"pp x stages per rank = {pp} x {per_rank} = {n_stages} pipeline stages but the model has "
                      f"{n_layers} layers (model.layers): each stage needs at least one layer (stages <= layers; "
                      f"{why.get(name, f'schedule {name} puts one stage on each rank')}); use pp <= {most}"
                      f"{' or fewer virtual_stages' if name == 'Interleaved1F1B' else ''}, or give the model at "
                      f"least {n_stages} layers")
    if n_stages > 1 and not faults:
        try:
            stage_layout(n_layers, n_stages, input_weight=input_weight, output_weight=output_weight)
        except ValueError as error:
            faults.append(f"{error}; lower input_weight/output_weight or the number of stages")
    if n_stages > 1 and model.tied:
        faults.append("the head shares the embedding's weight (tie_embeddings=True) but pipeline parallelism puts "
                      "the embedding on the first stage and the head on the last; set model.tie_embeddings=False "
                      "or pp=1")
    if n_microbatches is not None and n_stages > 1:
        faults += microbatch_faults(name, pp, virtual_stages, n_microbatches)
    return faults


def microbatch_faults(schedule: str, pp: int, virtual_stages: int, n_microbatches: int) -> list[str]:
    """Why `n_microbatches` micro-batches per step cannot run `schedule` on `pp` ranks (empty:
    they can), each naming the config paths that set the count."""
    name = schedule_name(schedule)
    n_stages = pp * stages_per_rank(name, virtual_stages)
    how = ("set parallel.n_microbatches, or raise the trainer's micro-batch count (batch_size / "
           "(step.micro_batch_size x data-parallel degree))")
    faults = []
    if name in ("1F1B", "DualPipeV") and n_microbatches < (pp if name == "1F1B" else n_stages):
        need = pp if name == "1F1B" else n_stages
        faults.append(f"schedule {name} needs at least {need} micro-batches per step on pp={pp}, got "
                      f"{n_microbatches}; {how}, or lower pp")
    if name == "Interleaved1F1B":
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            faults.append(f"schedule Interleaved1F1B needs the micro-batch count ({n_microbatches}) to be a "
                          f"multiple of max(1, micro-batches // pp) = {rounds}; use a multiple of pp={pp}: {how}")
    return faults


class PipelineStageModule(DecoderLM):
    """One pipeline stage of a `DecoderLM`: the model itself, cut down to the part this stage
    holds (`DecoderLM._share_part_of`): the model's own submodules under the model's own names
    (`embedding`, `layers.<i>` for the held layers, `norm`, `head`, `mtp.<k>`), None for
    those it does not hold. It computes with the decoder's own `hidden_states` and `losses`,
    which skip what is absent: no second copy of the forward or the loss to keep in step.

    forward(*inputs, doc_ids: [b, T], targets: [b, T]) (the schedules' calling convention):
    - first stage: inputs = (tokens [b, T] int64,);
    - other stages: inputs = (x [b, T, D],) plus, when the model has MTP modules, the raw
      token embeddings [b, T, D] the first stage passed on;
    - a stage that is not last returns (x,) or (x, embeddings); the last stage returns the
      micro-batch's loss (a scalar: the sum of `DecoderLM.losses`' terms on its part:
      lm + mtp + its blocks' balance losses).

    The MoE balance losses of a stage's own blocks join the backward pass where they arise:
    on the last stage they are part of the loss; on another stage the output carries them
    (`_AuxiliaryGradient`: identity forward, and the backward gives each term the gradient 1
    a summed loss would). Every training forward appends its detached terms (`lm`, `mtp`,
    `balance`, those that exist here) to `records`, which the runner reads and clears.
    """

    def __init__(self, *, model: DecoderLM, spec: StageSpec):
        nn.Module.__init__(self)  # not DecoderLM.__init__: a stage builds no module, it shares the model's
        self._share_part_of(model, layers=spec.layers, first=spec.first, last=spec.last)
        self.spec = spec
        # MTP modules on the last stage read the embeddings the first stage computed
        self.passes_embeddings = len(model.mtp) > 0 and spec.n_stages > 1
        self.records: list[dict[str, torch.Tensor]] = []
        self.compute_context = None  # a zero-argument factory of a context (autocast) the forward runs in
        # Under tensor parallelism: the tp mesh. The residual stream between stages is then
        # sequence-parallel (DTensor `Shard(1)`), but stages exchange plain tensors: outputs leave
        # as this rank's [b, T/tp, D] shard and inputs are re-wrapped on arrival.
        self.sequence_mesh: DeviceMesh | None = None

    def init_weights(self) -> None:
        """Refused: a stage's weights are drawn with the whole model's, in the single-process
        order (`materialize_stages`); drawn here they would follow neither."""
        raise NotImplementedError("a pipeline stage is initialised with the model it was cut from: materialize_stages")

    def forward(self, *inputs: torch.Tensor, doc_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.compute_context is None:
            return self._forward(inputs, doc_ids, targets)
        with self.compute_context():
            return self._forward(inputs, doc_ids, targets)

    def _forward(self, inputs: tuple[torch.Tensor, ...], doc_ids: torch.Tensor | None,
                 targets: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.spec.first and self.sequence_mesh is not None:  # this rank's sequence shards, as sent
            inputs = tuple(DTensor.from_local(t, self.sequence_mesh, [Shard(1)], run_check=False) for t in inputs)
        embeddings = self._embeddings(inputs)
        if self.spec.last:
            if targets is None:
                raise ValueError("the last pipeline stage computes the loss: pass targets= to the schedule's step")
            # super(), not self.losses: FSDP registers `losses` of a stage it roots as a forward
            # method of its own (sharding.shard), whose hooks this forward has already run
            terms = super().losses(inputs[0], targets, doc_ids=doc_ids, embeddings=embeddings)
            self._record(terms)
            return torch.stack(list(terms.values())).sum()
        x = self.hidden_states(inputs[0], doc_ids=doc_ids, embeddings=embeddings)
        balance = self.balance_loss()
        if balance is not None:
            self._record({"balance": balance})
            x = _AuxiliaryGradient.apply(x, balance)
        # a new tensor, not the received one (nor a view of it, which the schedules' backward
        # cannot detach): the stage's output must be a node of this stage's graph
        out = (x, embeddings if self.spec.first else embeddings.clone()) if self.passes_embeddings else (x,)
        if self.sequence_mesh is not None:
            out = tuple(t.to_local().clone() if isinstance(t, DTensor) else t for t in out)
        return out

    def _embeddings(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The raw token embeddings [b, T, D] the MTP modules read, where they travel down the
        pipeline: looked up once on the first stage (its layers read the same lookup), received
        on the others; None without MTP (a single stage's `losses` looks them up itself)."""
        if not self.passes_embeddings:
            return None
        return self.embedding(inputs[0]) if self.spec.first else inputs[1]

    def _record(self, terms: dict[str, torch.Tensor]) -> None:
        self.records.append({name: value.detach() for name, value in terms.items()})


class _AuxiliaryGradient(torch.autograd.Function):
    """y = x in the forward; in the backward, x gets y's gradient and `aux` (a scalar loss
    term computed on this stage) the gradient 1, as if it had been added to the loss the
    last stage backpropagates (the schedule divides every gradient by the micro-batch count
    afterwards, as it does the loss's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.clone()  # not x or a view of it: the schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class PipelinedModel(nn.Module):
    """This rank's share of a pipelined `DecoderLM`: the submodules its stages hold, under
    the model's names (so `named_parameters`, `state_dict` and checkpoints use the same keys
    as a single-process run, restricted to this rank), plus `stages`, the stage modules in
    the order this rank runs them.

    It has no `forward`/`losses`: a pipelined model runs only through the schedule
    (`PipelineRunner`). Until `materialize_stages` it also keeps the whole model (meta
    device) it was cut from, to initialise it in the single-process order.
    """

    def __init__(self, *, model: DecoderLM, stages: list[PipelineStageModule]):
        super().__init__()
        self.stages = stages  # a plain list: their submodules are registered below under the model's names
        self._whole = [model]  # not a submodule: dropped once materialised
        self.vocab_size, self.dim = model.vocab_size, model.dim
        self.layers = nn.ModuleDict()
        self.mtp = nn.ModuleDict()
        for stage in stages:
            if stage.spec.first:
                self.embedding, self.position, self.embedding_dropout = \
                    stage.embedding, stage.position, stage.embedding_dropout
            self.layers.update(stage.layers)
            if stage.spec.last:
                self.norm, self.head = stage.norm, stage.head
                self.mtp.update(stage.mtp)

    @property
    def first(self) -> bool:
        """Whether this rank holds the first stage (the embedding)."""
        return any(stage.spec.first for stage in self.stages)

    @property
    def last(self) -> bool:
        """Whether this rank holds the last stage (norm, head, MTP; where the loss is computed)."""
        return any(stage.spec.last for stage in self.stages)

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in stage.blocks()]


def split_stages(model: DecoderLM, *, pp_rank: int, pp_size: int, virtual_stages: int = 1, schedule: str = "1F1B",
                 input_weight: int = 0, output_weight: int = 0) -> list[PipelineStageModule]:
    """The stage modules rank `pp_rank` of `pp_size` holds, in increasing stage order
    (`schedule` decides how many and which: see the module docstring). Raises ValueError
    with every fault `pipeline_faults` finds. Works on a model on the meta device (nothing
    is allocated or copied: the stages hold the model's own submodules)."""
    faults = pipeline_faults(model, pp_size, virtual_stages, schedule=schedule, input_weight=input_weight,
                             output_weight=output_weight)
    if faults:
        raise ValueError("cannot pipeline this model: " + "; ".join(faults))
    n_stages = pp_size * stages_per_rank(schedule, virtual_stages)
    specs = stage_layout(len(model.layers), n_stages, input_weight=input_weight, output_weight=output_weight)
    indices = sorted(local_stage_indices(pp_rank, pp_size, n_stages, schedule))
    return [PipelineStageModule(model=model, spec=specs[i]) for i in indices]


def pipeline(model: DecoderLM, *, pp_rank: int, pp_size: int, virtual_stages: int = 1, schedule: str = "1F1B",
             input_weight: int = 0, output_weight: int = 0) -> PipelinedModel:
    """`split_stages`, wrapped as this rank's `PipelinedModel`."""
    stages = split_stages(model, pp_rank=pp_rank, pp_size=pp_size, virtual_stages=virtual_stages, schedule=schedule,
                          input_weight=input_weight, output_weight=output_weight)
    return PipelinedModel(model=model, stages=stages)


def materialize_stages(model: PipelinedModel, device: str) -> None:
    """Give this rank's stages the weights a single process would start from: the whole
    model is materialised and initialised in the single-process order (FSDP-sharded stage
    parameters keep their shard of it, as `sharding.materialize_sharded` does), then every
    tensor no local stage holds is released to the meta device. Holds one full copy of the
    weights while initialising; afterwards only this rank's. The random state advances
    exactly as one process's `init_weights` advances it."""
    from tessera.components.parallel.sharding import materialize_sharded

    if not model._whole:
        raise RuntimeError("materialize_stages: this pipelined model was already materialised")
    whole = model._whole[0]
    materialize_sharded(whole, device)  # plain tensors: init as is; DTensors: full init, keep the shard
    kept = {id(t) for t in [*model.parameters(), *model.buffers()]}
    for module in whole.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) not in kept:
                    released = torch.empty_like(tensor, device="meta")
                    store[name] = nn.Parameter(released, tensor.requires_grad) \
                        if isinstance(tensor, nn.Parameter) else released
    model._whole.clear()
