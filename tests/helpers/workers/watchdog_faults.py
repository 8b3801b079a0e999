"""Run by tests/test_watchdog.py under torchrun: the llama recipe from its command line, with
a fault injected into one rank's training steps by environment variables.

    TESSERA_TEST_HANG_RANK=1 TESSERA_TEST_HANG_AT_STEP=2   rank 1 never finishes step 2
    TESSERA_TEST_SLOW_RANK=1 TESSERA_TEST_SLOW_S=0.3       rank 1 takes 0.3 s longer every step

(both at once: slow steps, then the hang).

    torchrun ... tests/helpers/workers/watchdog_faults.py debug steps=8 ...
"""

from __future__ import annotations

import functools
import os
import time

from tessera.components.train.step import StepRunner
from tessera.recipes.llama_pretrain import recipe


def inject() -> None:
    """Wrap `StepRunner.run` on the rank the environment names (nothing when it names none)."""
    rank = str(os.environ.get("RANK", "0"))
    if os.environ.get("TESSERA_TEST_SLOW_RANK") == rank:
        extra = float(os.environ["TESSERA_TEST_SLOW_S"])
        original = StepRunner.run

        @functools.wraps(original)
        def slow(self, state):  # after the step's collectives: this rank's own time grows
            outcome = original(self, state)
            time.sleep(extra)
            return outcome

        StepRunner.run = slow
    if os.environ.get("TESSERA_TEST_HANG_RANK") == rank:
        hang_at = int(os.environ["TESSERA_TEST_HANG_AT_STEP"])
        before = StepRunner.run

        @functools.wraps(before)
        def hung(self, state):  # the hang comes before the step's first collective
            if state.step == hang_at:
                time.sleep(3600)
            return before(self, state)

        StepRunner.run = hung


if __name__ == "__main__":
    inject()
    recipe.main()
