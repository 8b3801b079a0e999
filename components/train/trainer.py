"""`train`: a run from its config to its result, as a short sequence of parts that each do one job.

A recipe preset is `fdl.Partial(train, model=..., data=..., ...)`. The model arrives built
on the meta device (see `tessera.components.train.launch`), so the parallel plan sees it before
any weight exists. The parts: set-up (`assemble`), restore or start fresh (`run_state`), the
loop (`loop`: each step by `step.StepRunner`, rejected steps by `recovery`, reports by
`report`, validation by `validation`) and the finish (`finish`: final validation and summary).

The signature holds the run's identity; everything else sits in the option group of the part
that reads it (`step=`, `compute=`, `validation=`, `progress=`, `checkpoint=`, `guard=`,
`metrics=`, `watchdog=`), so a new feature adds a field to its group rather than an argument here.
"""

from __future__ import annotations

import time

import torch

from tessera.components.attention import rules
from tessera.components.interfaces import OptimizerFactory, ParallelPlan, PrecisionPolicy, Schedule, TrainingData
from tessera.components.model.decoder import DecoderLM
from tessera.components.train.assemble import Assembled, assemble
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.compute import Compute
from tessera.components.train.finish import TrainResult, finish
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.init_options import InitOptions
from tessera.components.train.loop import TrainingLoop
from tessera.components.train.metrics import Metrics
from tessera.components.train.progress import Progress
from tessera.components.train.run_state import RunState, live_state, restore_or_start_fresh
from tessera.components.train.step import StepRunner
from tessera.components.train.step_options import StepOptions
from tessera.components.train.validation import Validation, Validator
from tessera.components.train.watchdog import Watchdog
from tessera.registry.invariants import invariant

__all__ = ["TrainResult", "train"]

# The groups' defaults: frozen, so one instance serves every call.
_STEP, _COMPUTE, _VALIDATION, _PROGRESS = StepOptions(), Compute(), Validation(), Progress()
_INIT = InitOptions()
_WATCHDOG = Watchdog()


@invariant("steps > 0 and batch_size > 0 and seq_len > 0",
           lambda steps, batch_size, seq_len: steps > 0 and batch_size > 0 and seq_len > 0,
           fix="use positive steps, batch_size and seq_len")
@invariant("data.vocab_size <= model.vocab_size", lambda data, model: data.vocab_size <= model.vocab_size,
           fix="give the model at least as many token ids as the data's tokenizer (model.vocab_size)")
@invariant(**rules.WINDOW_FITS_SEQUENCE)
@invariant(**rules.SEQUENCE_FILLS_BLOCKS)
@invariant("step.micro_batch_size divides batch_size",
           lambda batch_size, step: step.micro_batch_size is None or batch_size % step.micro_batch_size == 0,
           fix="choose a step.micro_batch_size that divides batch_size")
def train(*, model: DecoderLM, data: TrainingData, optimizer: OptimizerFactory, scheduler: Schedule,
          parallel: ParallelPlan | None = None, precision: PrecisionPolicy | None = None,
          steps: int, batch_size: int, seq_len: int, seed: int = 0, device: str = "cpu",
          checkpoint: Checkpointer | None = None, guard: StabilityGuard | None = None, metrics: Metrics | None = None,
          step: StepOptions = _STEP, compute: Compute = _COMPUTE, validation: Validation = _VALIDATION,
          progress: Progress | None = _PROGRESS, init: InitOptions = _INIT,
          watchdog: Watchdog = _WATCHDOG) -> TrainResult:
    """Train `model` for `steps` optimizer steps of next-token prediction on `batch_size`
    sequences (over all processes) of `seq_len` tokens; the same `seed` gives the same run.

    `optimizer` is called with the parameter groups; `scheduler` multiplies the learning rate;
    `parallel` lays the model out (default: one process); `precision` (default `auto`: bf16
    autocast where the device runs bf16 matmuls faster, fp32 elsewhere; said first);
    `device` is where weights and batches go. `checkpoint`: when and where to save, and whether
    to resume exactly; `guard`: skip bad steps, roll back, stop with `TrainingDiverged`;
    `metrics`: logs, MFU, periodic validation, summary, plots (each None: off; a final
    validation loss that is not finite raises `TrainingDiverged` all the same). `step`,
    `compute`, `validation`, `progress` (None: silent), `init` (initial weights from a
    transformers checkpoint), `watchdog` (hung steps and stragglers named): see their classes.
    """
    run = assemble(model=model, data=data, optimizer=optimizer, parallel=parallel, precision=precision,
                   batch_size=batch_size, seq_len=seq_len, seed=seed, device=device, step=step, compute=compute,
                   announce=progress is not None, init=init)
    eval_every = metrics.eval_every if metrics is not None else 0  # every rank validates (collectives)
    downstream = metrics.downstream if metrics is not None else ()  # likewise every rank scores the tasks
    if not run.parallel.is_main_process:  # one process reports and writes files
        metrics, progress = None, None
    runner = StepRunner(model=run.model, optimizer=run.optimizer, raw_optimizer=run.raw_optimizer,
                        parallel=run.parallel, precision=run.precision, data=data, scheduler=scheduler, options=step,
                        guard=guard, batch_size=batch_size, micro_batch_size=run.micro_batch_size, seq_len=seq_len,
                        data_parallel_size=run.data_parallel.size, device=device)
    state = RunState(generator=torch.Generator().manual_seed(seed))
    started = time.perf_counter()
    run.model.train()
    resumed = _restore(run, runner, checkpoint, state, guard=guard, data=data, say=progress is not None)
    if metrics is not None:
        metrics.start(dtype=run.precision.compute_dtype, device=device, resume=resumed, devices=run.processes,
                      moe_layers=run.moe_layers)
    start_step = state.step
    validator = Validator(model=run.model, data=data, parallel=run.parallel, precision=run.precision,
                          batches=validation.batches, batch_size=run.micro_batch_size, seq_len=seq_len, seed=seed,
                          device=device, downstream=downstream)
    end = TrainingLoop(runner=runner, state=state, steps=steps, seq_len=seq_len, validator=validator,
                       eval_every=eval_every, checkpoint=checkpoint, guard=guard, metrics=metrics, progress=progress,
                       flops_per_token=run.flops_per_token / run.processes, watchdog=watchdog).run()
    return finish(end=end, runner=runner, state=state, steps=steps, start_step=start_step, validator=validator,
                  checkpoint=checkpoint, metrics=metrics, precision_note=run.precision_note, started=started)


def _restore(run: Assembled, runner: StepRunner, checkpoint: Checkpointer | None, state: RunState, *,
             guard: StabilityGuard | None, data: TrainingData, say: bool) -> bool:
    """Resume from a checkpoint or start fresh (True: resumed), then hand the plan the run's
    progress: a plan that restores a replica from a live peer (torchft) carries it too."""
    resumed = restore_or_start_fresh(checkpoint, state, model=run.model, optimizer=run.optimizer,
                                     scaler=runner.scaler, guard=guard, data=data, say=say, parallel=run.parallel)
    run.parallel.share_run_state(*live_state(state, scaler=runner.scaler, guard=guard, data=data))
    return resumed
