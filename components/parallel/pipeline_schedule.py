"""Pipeline parallelism, part 2: running this rank's stages with a schedule of
`torch.distributed.pipelining` (GPipe, 1F1B, interleaved 1F1B, DualPipeV), the loss terms
gathered over the pipeline, and the measured pipeline bubble.

Micro-batches: by default the schedule's micro-batches are the trainer's (one per gradient
accumulation step, `n_micro` of them); with `n_microbatches=m` the step's rows are
concatenated and split into m equal micro-batches instead (m must divide the rows), which
decouples the pipeline's depth of micro-batching from the trainer's `micro`. Either way the
gradient is that of the mean loss over the step's micro-batches (the schedule divides by m).

Stage metadata is given to `PipelineStage` up front (shapes from the micro-batch, dtype of
the activations), so torch runs no shape-inference forward: an inference pass would run
the real modules once more and count a step's MoE load twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from tessera.components.parallel.pipeline import PipelinedModel, PipelineStageModule, schedule_name

TERMS = ("lm", "mtp", "balance")
"""The loss terms a pipelined `DecoderLM` reports (those its model has), as `DecoderLM.losses`."""


class PipelineRunner:
    """Runs one training step (or a forward-only evaluation) of `model`, this rank's
    `PipelinedModel`, under `schedule` over the pipeline process `group`.

    Args:
        model: this rank's stages (`tessera.components.parallel.pipeline.pipeline`).
        schedule: "GPipe", "1F1B", "Interleaved1F1B" or "DualPipeV" (the one the model was cut for).
        group: the process group of the `pp` mesh dim (`dims.get_mesh("pp").get_group()`).
        device: the device stages compute on.
        n_microbatches: micro-batches per step of the schedule; None: the trainer's micro-batches.
        activation_dtype: dtype of the activations passed between stages; None: the stages'
            parameter dtype (the residual stream's dtype, autocast or not).
        compute_context: zero-argument factory of the context each stage's forward runs in
            (the precision policy's autocast); None: none.
        sequence_shards: under tensor parallelism, the tp degree: stages exchange each rank's
            [b, T/tp, D] shard of the sequence-parallel residual stream (T must divide by it).
    """

    def __init__(self, *, model: PipelinedModel, schedule: str, group: Any, device: str | torch.device,
                 n_microbatches: int | None = None, activation_dtype: torch.dtype | None = None,
                 compute_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 sequence_shards: int = 1):
        self.model = model
        self.sequence_shards = sequence_shards
        self.schedule = schedule_name(schedule)
        self.group = group
        self.device = torch.device(device)
        self.n_microbatches = n_microbatches
        self.activation_dtype = activation_dtype or _parameter_dtype(model)
        for stage in model.stages:
            stage.compute_context = compute_context
        self._schedules: dict[tuple[int, int, int], Any] = {}
        self.timing: dict[str, float] | None = None  # set to {} to accumulate busy seconds per action kind

    # -- the step ----------------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module | None, micro_batches: Iterable[dict[str, torch.Tensor]], *,
                         n_micro: int, losses: Callable | None = None,
                         backward: Callable | None = None) -> dict[str, float]:
        """`ParallelPlan.forward_backward` under pipeline parallelism: the step's forward and
        backward passes over all of its micro-batches (every rank of the pipeline calls it with
        the same batches); gradients of the mean loss land in this rank's parameters' `.grad`.

        `losses` and `backward` (the trainer's single-process callables) are not used: the
        stages compute the loss terms themselves and the schedule backpropagates (so no loss
        scaling and no second-order backward under pipeline parallelism). Returns each term's
        mean over the micro-batches, identical on every rank of the pipeline.
        """
        batches = list(micro_batches)
        if len(batches) != n_micro:
            raise ValueError(f"pipeline step: expected {n_micro} micro-batches, got {len(batches)}")
        self._run(batches)
        return self._gather_terms()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward-only loss terms of `batches` (put the model in eval mode first: no balance
        terms then), each term's mean over the batches, identical on every rank of the pipeline.

        Every batch goes through the stages one after another with plain send/recv (torch's
        schedules have no forward-only mode for DualPipeV's V), so it works under every
        schedule and any number of batches; evaluation is not where the bubble matters."""
        batches = list(batches)
        stages = {stage.spec.index: stage for stage in self.model.stages}
        n_stages = self.model.stages[0].spec.n_stages
        owner = generate_stage_to_rank_mapping(dist.get_world_size(self.group), n_stages,
                                               style="v" if self.schedule == "DualPipeV" else "loop")
        me = dist.get_rank(self.group)
        for stage in self.model.stages:
            stage.records.clear()
        for batch in batches:
            tokens, targets = batch["tokens"].to(self.device), batch["targets"].to(self.device)
            kwargs = {"targets": targets}
            if batch.get("doc_ids") is not None:
                kwargs["doc_ids"] = batch["doc_ids"].to(self.device)
            carried: tuple[torch.Tensor, ...] = ()
            for index in range(n_stages):
                if owner[index] != me:
                    continue
                module = stages[index]
                if index == 0:
                    inputs = (tokens,)
                elif owner[index - 1] == me:
                    inputs = carried
                else:
                    shape = (tokens.shape[0], self._local_seq(tokens.shape[1]), module.dim)
                    inputs = tuple(torch.empty(*shape, dtype=self.activation_dtype, device=self.device)
                                   for _ in range(2 if module.passes_embeddings else 1))
                    for tensor in inputs:
                        dist.recv(tensor, group=self.group, group_src=owner[index - 1])
                out = module(*inputs, **kwargs)
                if index < n_stages - 1:
                    if owner[index + 1] == me:
                        carried = out
                    else:
                        for tensor in out:
                            dist.send(tensor.contiguous(), group=self.group, group_dst=owner[index + 1])
        self._n = len(batches)
        return self._gather_terms()

    def _run(self, batches: list[dict[str, torch.Tensor]]) -> None:
        tokens = torch.cat([b["tokens"] for b in batches]).to(self.device)
        targets = torch.cat([b["targets"] for b in batches]).to(self.device)
        doc_ids = torch.cat([b["doc_ids"] for b in batches]).to(self.device) if batches[0].get("doc_ids") is not None \
            else None
        m = self.n_microbatches or len(batches)
        rows, seq = tokens.shape
        if rows % m:
            raise ValueError(f"pipeline step: {rows} sequences do not split into n_microbatches={m} equal "
                             f"micro-batches; make batch_size / data-parallel degree a multiple of {m}")
        schedule = self._schedule(m, rows // m, seq)
        for stage in self.model.stages:
            stage.records.clear()
        kwargs: dict[str, torch.Tensor] = {"targets": targets}
        if doc_ids is not None:
            kwargs["doc_ids"] = doc_ids
        schedule.step(tokens, target=targets, return_outputs=False, **kwargs)
        self._n = m

    def _gather_terms(self) -> dict[str, float]:
        """Each term's mean over the step's micro-batches, summed over this rank's stages and
        then over the pipeline (lm and mtp come from the last stage only; balance from every
        stage holding MoE blocks), so every pipeline rank returns the whole model's terms."""
        totals = torch.zeros(2 * len(TERMS), dtype=torch.float64)
        for stage in self.model.stages:
            for record in stage.records:
                for i, name in enumerate(TERMS):
                    if name in record:
                        totals[i] += record[name].double().item()
                        totals[len(TERMS) + i] = 1.0
            stage.records.clear()
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(totals, group=self.group)  # one small all-reduce; gloo and NCCL both sum
        return {name: totals[i].item() / self._n for i, name in enumerate(TERMS) if totals[len(TERMS) + i] > 0}

    # -- schedules -----------------------------------------------------------------------------
    def _schedule(self, m: int, rows: int, seq: int) -> Any:
        key = (m, rows, seq)
        if key not in self._schedules:
            stages = [self._stage(module, rows, seq) for module in self.model.stages]
            cls = get_schedule_class(self.schedule)
            if issubclass(cls, PipelineScheduleSingle):
                self._schedules[key] = cls(stages[0], n_microbatches=m, loss_fn=_output_is_loss)
            else:
                self._schedules[key] = cls(stages, n_microbatches=m, loss_fn=_output_is_loss)
        return self._schedules[key]

    def _stage(self, module: PipelineStageModule, rows: int, seq: int) -> PipelineStage:
        """torch's `PipelineStage` for `module` with its input/output metadata stated (static
        mode: no inference forward)."""
        spec = module.spec

        def activation() -> torch.Tensor:
            return torch.empty(rows, self._local_seq(seq), module.dim, dtype=self.activation_dtype, device="meta",
                               requires_grad=True)

        hops = 2 if module.passes_embeddings else 1
        inputs = (torch.empty(rows, seq, dtype=torch.long, device="meta"),) if spec.first else \
            tuple(activation() for _ in range(hops))
        outputs = (torch.empty((), dtype=torch.float32, device="meta", requires_grad=True),) if spec.last else \
            tuple(activation() for _ in range(hops))
        stage = PipelineStage(module, spec.index, spec.n_stages, self.device, input_args=inputs,
                              output_args=outputs, group=self.group)
        self._time(stage)
        return stage

    def _local_seq(self, seq: int) -> int:
        """Positions of the residual stream this rank sends and receives between stages."""
        if seq % self.sequence_shards:
            raise ValueError(f"pipeline x tensor parallelism: seq_len {seq} must be a multiple of tp="
                             f"{self.sequence_shards} (stages exchange equal sequence shards)")
        return seq // self.sequence_shards

    def _time(self, stage: PipelineStage) -> None:
        """Accumulate the compute time of `stage`'s forward, backward and weight-gradient
        actions into `self.timing` (when it is a dict): the busy time `measure_bubble` reads."""
        for kind, name in (("F", "forward_one_chunk"), ("B", "backward_one_chunk"), ("W", "backward_weight_one_chunk")):
            inner = getattr(stage, name)

            def timed(*args: Any, _inner: Callable = inner, _kind: str = kind, **kwargs: Any) -> Any:
                if self.timing is None:
                    return _inner(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self.timing[_kind] = self.timing.get(_kind, 0.0) + time.perf_counter() - start
                    self.timing[_kind + "_count"] = self.timing.get(_kind + "_count", 0.0) + 1

            setattr(stage, name, timed)


def _output_is_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage already returns the micro-batch's loss."""
    return output


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


# -- the measured pipeline bubble ------------------------------------------------------------------
def measure_bubble(runner: PipelineRunner, step: Callable[[], Any]) -> dict[str, float]:
    """Run `step()` (one or more pipeline steps through `runner`) and return this rank's
    wall seconds, busy seconds (its stages' forward/backward/weight-gradient compute), the
    measured idle share 1 - busy/wall, and the mean seconds per F, B and W action (to put
    into a closed form). Call it after a warm-up step; compare the ranks' idle shares with
    `tessera.components.train.pipeline_bubble.bubble_fraction` ((p-1)/(m+p-1) for GPipe and 1F1B,
    DualPipeV's own formula)."""
    runner.timing = {}
    if runner.group is not None:
        dist.barrier(group=runner.group)  # every rank starts the clock together
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    timing, runner.timing = runner.timing, None
    busy = timing.get("F", 0.0) + timing.get("B", 0.0) + timing.get("W", 0.0)
    means = {f"{k}_mean": timing[k] / timing[k + "_count"] for k in ("F", "B", "W") if timing.get(k + "_count")}
    return {"wall": wall, "busy": busy, "bubble": 1 - busy / wall if wall > 0 else 0.0, **means}
