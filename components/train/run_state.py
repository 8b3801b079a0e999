"""What a run carries from step to step, and how it is saved into and restored from a checkpoint.

Exact resume needs more than weights and optimizer state: the step and token counters, the
loss history, the global RNG, the batch-sampling generator, the loss scaler, the stability
guard's window and the data loader's position. `snapshot` gathers them into the checkpoint's
`extra` tree; `restore` puts them back; `restore_or_start_fresh` is how a run begins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tessera.components.interfaces import ParallelPlan, StatefulData, TrainingData
from tessera.components.train.checkpoint import AUTO, Checkpointer
from tessera.components.train.guard import StabilityGuard


@dataclasses.dataclass
class RunState:
    """The counters and history of one run.

    `step`: optimizer steps taken; `tokens`: training tokens consumed; `history`: every loss
    term per step (and the steps skipped or rolled back); `generator`: batch sampling."""

    generator: torch.Generator
    step: int = 0
    tokens: int = 0
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        """The LM loss of every step taken."""
        return self.history.setdefault("lm", [])

    def record(self, name: str, value: float) -> None:
        self.history.setdefault(name, []).append(value)


def snapshot(state: RunState, *, scaler: Any, guard: StabilityGuard | None, data: TrainingData,
             parallel: ParallelPlan | None = None) -> dict[str, Any]:
    """The checkpoint's `extra` tree: everything besides weights and optimizer state (the
    parallel plan's own state too: compression hooks' error feedback, DiLoCo's outer step)."""
    return {"tokens": state.tokens, "history": state.history, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data_generator": state.generator.get_state(), "scaler": scaler.state_dict() if scaler else {},
            "guard": guard.state_dict() if guard is not None else {},
            "data": data.state_dict() if isinstance(data, StatefulData) else {},
            "parallel": parallel.state_dict() if parallel is not None else {}}


def restore(checkpoint: Checkpointer, path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            state: RunState, scaler: Any, guard: StabilityGuard | None, data: TrainingData,
            parallel: ParallelPlan | None = None) -> None:
    """Load checkpoint `path` into the model, optimizer, `state`, the global RNG and `parallel`."""
    restored = checkpoint.load(path, model=model, optimizer=optimizer)
    state.step = restored["step"]
    _load_extra(restored["extra"], state=state, scaler=scaler, guard=guard, data=data, parallel=parallel)


def live_state(state: RunState, *, scaler: Any, guard: StabilityGuard | None,
               data: TrainingData) -> tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """`(state_dict, load_state_dict)` over the run's progress as it is now: the checkpoint's
    `extra` tree (without the plan's state) plus the step, for `ParallelPlan.share_run_state`."""
    def state_dict() -> dict[str, Any]:
        return {"step": state.step, **snapshot(state, scaler=scaler, guard=guard, data=data)}

    def load_state_dict(received: dict[str, Any]) -> None:
        state.step = received["step"]
        _load_extra(received, state=state, scaler=scaler, guard=guard, data=data, parallel=None)

    return state_dict, load_state_dict


def _load_extra(extra: dict[str, Any], *, state: RunState, scaler: Any, guard: StabilityGuard | None,
                data: TrainingData, parallel: ParallelPlan | None) -> None:
    """Put `snapshot`'s tree back: counters, history, RNGs, scaler, guard, data position, plan."""
    state.tokens, state.history = extra["tokens"], extra["history"]
    torch.set_rng_state(extra["rng"])
    if extra.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(extra["cuda_rng"]))
    state.generator.set_state(extra["data_generator"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    if guard is not None and extra.get("guard"):
        guard.load_state_dict(extra["guard"])
    if isinstance(data, StatefulData):
        data.load_state_dict(extra["data"])
    if parallel is not None and extra.get("parallel"):
        parallel.load_state_dict(extra["parallel"])


def restore_or_start_fresh(checkpoint: Checkpointer | None, state: RunState, *, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, scaler: Any, guard: StabilityGuard | None,
                           data: TrainingData, say: bool, parallel: ParallelPlan | None = None) -> bool:
    """Resume from the checkpoint `checkpoint.resume` asks for (True, "auto" or a path), or start
    fresh, moving an earlier run's checkpoints (or, when nothing intact was found to resume,
    its damaged and unfinished ones) aside rather than mixing them with this run's.
    `say`: print what was done (the main process of a run that shows progress); under
    `resume="auto"` the line starts "resume auto:", so a restarted job's log says which."""
    if checkpoint is None:
        return False
    auto = "resume auto: " if checkpoint.resume == AUTO else ""
    resume_from = checkpoint.resume_path()
    if resume_from is None:
        moved = checkpoint.set_aside_previous()
        if say and auto:
            _say(f"{auto}no checkpoint in {checkpoint.folder} yet, starting fresh")
        if moved is not None and say:
            _say(f"note: a fresh run: the earlier run's checkpoints are now in {moved}")
        return False
    restore(checkpoint, resume_from, model=model, optimizer=optimizer, state=state, scaler=scaler, guard=guard,
            data=data, parallel=parallel)
    if say:
        _say(f"{auto}resuming from {resume_from} (step {state.step}, {state.tokens:,} tokens)")
    return True


def _say(line: str) -> None:
    Console().print(line, highlight=False, soft_wrap=True)
