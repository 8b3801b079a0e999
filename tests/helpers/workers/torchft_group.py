"""One replica group of a `parallel=@torchft` run, for tests/test_torchft_plan.py.

    REPLICA_GROUP_ID=G TORCHFT_LIGHTHOUSE=http://... python tests/helpers/workers/torchft_group.py JOB.json

JOB.json: {"args": recipe overrides (the plan included), "weights": path prefix, "alone_delay":
seconds a step sleeps after it ran while not every replica group is in the quorum (so a group
training alone waits for a restarted one rather than finishing first), "die_at": a step after
which this process kills itself with SIGKILL, or null}. Each rank writes
its group's whole tensors to `<weights>.<rank>`; rank 0 writes `<weights>.result.json`:
{"losses": [...], "step": the step the run ended at}.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import fiddle as fdl
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tessera.cli import resolve
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.train.launch import build_model_on_meta
from tessera.components.train.step import StepRunner
from tessera.recipes import llama_pretrain


def pace(alone_delay: float, die_at: int | None) -> None:
    """Every step prints its number and sleeps `alone_delay` s while some replica group is out of
    the quorum; the first step at or past `die_at` kills the process."""
    run = StepRunner.run

    def paced(self, state):
        outcome = run(self, state)
        # where the data stream stands after the step (the same on every share): a group that
        # rejoined must read on from where the others do
        digest = hashlib.sha1()
        for key, loader in sorted(self.data.state_dict().items()):
            digest.update(repr((key, loader["cursors"], loader["epochs"], loader["sequences"])).encode())
            digest.update(loader["rng"].numpy().tobytes())
        position = digest.hexdigest()[:12]
        print(f"ran step {state.step} data {position} tokens {state.tokens} at {time.time():.1f}", flush=True)
        if die_at is not None and state.step >= die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.parallel.manager.num_participants() < self.parallel.replica_groups:
            time.sleep(alone_delay)
        return outcome

    StepRunner.run = paced


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    pace(job.get("alone_delay", 0.0), job.get("die_at"))
    config, _ = resolve(llama_pretrain.recipe, job["args"])
    config.metrics = None
    config.checkpoint = None
    run_config = copy.copy(config)
    run_config.model = build_model_on_meta(config.model)  # as `launch` does
    train = fdl.build(run_config)
    result = train()
    full = get_model_state_dict(result.model, options=StateDictOptions(full_state_dict=True))
    save_file({k: v.clone() for k, v in full.items()}, job["weights"] + "." + os.environ["RANK"])
    dist.barrier()
    if os.environ["RANK"] == "0":
        step = train.keywords["parallel"].manager.current_step()
        Path(job["weights"] + ".result.json").write_text(json.dumps({"losses": result.losses, "step": step}))
    leave_process_group()


if __name__ == "__main__":
    main()
