"""Run by tests/test_resume_auto.py: a recipe's command line, as a user runs it, except that rank
KILL_RANK SIGKILLs itself right after writing checkpoint KILL_STEP, on the launcher's first
attempt only (TORCHELASTIC_RESTART_COUNT 0), as a node dying mid-run would; the restarted
attempt runs the same command to the end.

    KILL_RANK=1 KILL_STEP=2 torchrun ... tests/helpers/workers/killed_once.py [PRESET] [path=value ...] [--resume auto]
"""

from __future__ import annotations

import os
import signal
import sys

from tessera.cli.run import run_cli
from tessera.components.train.checkpoint import Checkpointer
from tessera.recipes.llama_pretrain import recipe


def _kill_after_save() -> None:
    """Wrap `Checkpointer.save` so the chosen rank dies once its checkpoint is written."""
    rank, step = int(os.environ["KILL_RANK"]), int(os.environ["KILL_STEP"])
    if os.environ.get("RANK", "0") != str(rank) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    save = Checkpointer.save

    def save_then_die(self: Checkpointer, at: int, **parts: object) -> object:
        path = save(self, at, **parts)
        if at == step:
            print(f"killed_once: rank {rank} dies after checkpoint {at}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Checkpointer.save = save_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    _kill_after_save()
    run_cli(recipe, sys.argv[1:])
