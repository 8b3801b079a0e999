"""Validation: the loss on a fixed sample of held-out batches, during the run (every
`Metrics.eval_every` steps) and at its end.

The sample is read once, at the first validation, as the first `batches` batches of the
validation stream the seed fixes, and kept: every validation of a run (and of a resumed
run, whose data does not save the validation stream's position) scores the same tokens,
whatever `eval_every` is, so validation losses at one step agree between runs.

A recipe sets the sample's size as `validation=fdl.Config(Validation, batches=8)`; on the
command line `validation.batches=2` (0: no validation batches, the loss reads 0).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tessera.components.evaluate.downstream import DownstreamEvaluator
from tessera.components.interfaces import BytesPerToken, ParallelPlan, PrecisionPolicy, TrainingData
from tessera.components.model.decoder import DecoderLM, cross_entropy
from tessera.registry.invariants import invariant


@invariant("batches >= 0", lambda batches: batches >= 0, fix="use validation.batches >= 0")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Validation:
    """How much held-out data the run is judged on: `batches` validation batches (each of the
    run's micro-batch size), the same sample every time for one seed."""

    batches: int = 8


@dataclasses.dataclass(kw_only=True)
class Validator:
    """Validates `model` on the sample `seed` fixes; every process calls it together (the
    plan may run a pipeline, and the loss is averaged over the data-parallel processes)."""

    model: DecoderLM
    data: TrainingData
    parallel: ParallelPlan
    precision: PrecisionPolicy
    batches: int
    batch_size: int
    seq_len: int
    seed: int
    device: str
    downstream: tuple[str, ...] = ()
    """Multiple-choice tasks scored with every validation (see `evaluate.downstream`)."""
    _sample: list[dict[str, torch.Tensor]] | None = dataclasses.field(default=None, init=False, repr=False)
    _downstream: DownstreamEvaluator | None = dataclasses.field(default=None, init=False, repr=False)
    _said_skipped: bool = dataclasses.field(default=False, init=False, repr=False)

    @property
    def sample(self) -> list[dict[str, torch.Tensor]]:
        """The fixed sample: `batches` batches of {"tokens", "targets", "doc_ids"} [batch_size,
        seq_len], read at the first access and the same object on every later one."""
        if self._sample is None:
            self._sample = validation_sample(self.data, batches=self.batches, batch_size=self.batch_size,
                                             seq_len=self.seq_len, seed=self.seed)
        return self._sample

    def __call__(self) -> dict[str, float]:
        """Validation loss (nats/token, averaged over the data-parallel processes) and bits per
        byte (when the data knows its bytes per token), on `sample`; and `<task>_acc` for each
        `downstream` task."""
        sample = self.sample
        self.model.eval()
        loss = self.parallel.validation_loss(self.model, sample)
        self.model.train()
        whole_model = loss is None  # else the plan ran the forward itself: stages of a pipeline
        if loss is None:
            loss = mean_loss(self.model, sample, precision=self.precision, device=self.device)
        out = self.parallel.mean_over_data_parallel({"val_loss": loss}, self.device)
        if isinstance(self.data, BytesPerToken):
            out["val_bpb"] = out["val_loss"] / math.log(2) / self.data.bytes_per_token("val")
        if self.downstream and whole_model:
            out.update(self._downstream_evaluator()())
        elif self.downstream and not self._said_skipped and self.parallel.is_main_process:
            self._said_skipped = True  # scoring choices needs the whole model's logits on one process
            print(f"note: downstream tasks ({', '.join(self.downstream)}) are not scored under pipeline "
                  f"parallelism; score the checkpoint with `evaluate` instead", flush=True)
        return out

    def _downstream_evaluator(self) -> DownstreamEvaluator:
        if self._downstream is None:
            self._downstream = DownstreamEvaluator(model=self.model, data=self.data, tasks=tuple(self.downstream),
                                                   precision=self.precision, batch_size=self.batch_size,
                                                   max_length=self.seq_len, device=self.device, seed=self.seed)
        return self._downstream


@torch.no_grad()
def evaluate(model: DecoderLM, data: TrainingData, *, batches: int, batch_size: int, seq_len: int,
             precision: PrecisionPolicy, seed: int, device: str = "cpu") -> float:
    """Mean next-token cross-entropy on `batches` validation batches (a fixed sample per seed)."""
    sample = validation_sample(data, batches=batches, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return mean_loss(model, sample, precision=precision, device=device)


def validation_sample(data: TrainingData, *, batches: int, batch_size: int, seq_len: int,
                      seed: int) -> list[dict[str, torch.Tensor]]:
    """The next `batches` validation batches of the stream `seed` fixes: its first ones when
    nothing has read it before, as when a `Validator` reads (and keeps) its sample."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [data.batch("val", batch_size=batch_size, seq_len=seq_len, generator=generator) for _ in range(batches)]


@torch.no_grad()
def mean_loss(model: DecoderLM, batches: list[dict[str, torch.Tensor]], *, precision: PrecisionPolicy,
              device: str) -> float:
    """Mean next-token cross-entropy of `model` (in eval mode) over `batches`."""
    model.eval()
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision.autocast(torch.device(device).type):
            logits = model(batch["tokens"], doc_ids=batch["doc_ids"])
        total += cross_entropy(logits, batch["targets"]).item()
    model.train()
    return total / max(1, len(batches))
