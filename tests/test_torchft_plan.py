"""`parallel=@torchft`: replica groups, each its own job, under torchft's lighthouse.

Without faults two groups step as one process with the whole batch does (the straight run that
tests/test_mesh.py holds `@mesh(dp_replicate=2)` and HSDP to as well). With a group killed
mid-run, the other trains on alone, and the restarted group receives the live state and ends
with the same weights and step.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tessera.cli import resolve
from tessera.components.parallel import fault_tolerant
from tessera.components.parallel.fault_tolerant import FaultTolerant
from tessera.components.parallel.mesh import MeshError
from tessera.components.train.launch import build_model_on_meta, launch
from tessera.recipes import llama_pretrain

from helpers.launch import start, worker

LIGHTHOUSE = Path(sys.executable).parent / "torchft_lighthouse"
needs_torchft = pytest.mark.skipif(importlib.util.find_spec("torchft") is None or not LIGHTHOUSE.exists(),
                                   reason="torchft (and its torchft_lighthouse) is an optional extra: "
                                          "pip install -e '.[ft]'")
STEPS = 4
ARGS = ["debug", "batch_size=8", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "validation.batches=2", "scheduler.warmup_steps=2", "model.layers[*].attention.dropout=0.0",
        # rows of tokens absent from a batch get ~1e-9 gradients that differ with summation order;
        # Adam's default eps would blow those up to full-size steps of either sign
        "optimizer.eps=1e-5"]


def args(*extra: str, steps: int = STEPS) -> list[str]:
    return [*ARGS, f"steps={steps}", f"scheduler.total_steps={steps + 2}", *extra]


def straight_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of the same run in this process, with the whole batch."""
    config, _ = resolve(llama_pretrain.recipe, args("parallel=@single"))
    config.metrics = config.checkpoint = None
    result = launch(config)
    return result.losses, result.model.state_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lighthouse(min_replicas: int) -> tuple[subprocess.Popen, str]:
    """A lighthouse on a free port, once it accepts connections: (process, address). Waits up
    to 30 s (it took over 5 s to listen once, under a full suite on 2 cores), and starts again
    on another port if it exits first (the free port was taken between the probe and its bind)."""
    for _attempt in range(3):
        port, log = free_port(), tempfile.TemporaryFile()
        process = subprocess.Popen([str(LIGHTHOUSE), "--min_replicas", str(min_replicas), "--bind", f"[::]:{port}",
                                    "--join_timeout_ms", "1000", "--heartbeat_timeout_ms", "1000"],
                                   stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return process, f"http://localhost:{port}"
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            raise RuntimeError(f"the lighthouse did not listen on port {port} within 30 s")
        log.seek(0)
        exited = log.read()[-2000:].decode(errors="replace")
    raise RuntimeError(f"the lighthouse exited before listening, three times; last:\n{exited}")


def group(tmp: Path, name: str, replica: int, address: str, plan: str, *, processes: int = 1, steps: int = STEPS,
          alone_delay: float = 0.0, die_at: int | None = None) -> subprocess.Popen:
    """Replica group `replica` as its own job of `processes` (tests/helpers/workers/torchft_group.py; several:
    under torchrun), its log in tmp/name.log."""
    job = {"args": args(f"parallel={plan}", steps=steps),
           "weights": str(tmp / name), "alone_delay": alone_delay, "die_at": die_at}
    (tmp / f"{name}.json").write_text(json.dumps(job))
    log = open(tmp / f"{name}.log", "w")
    return start(worker("torchft_group"), str(tmp / f"{name}.json"), processes=processes, stdout=log,
                 stderr=subprocess.STDOUT,
                 env={"TORCHFT_LIGHTHOUSE": address, "REPLICA_GROUP_ID": str(replica)})


def finished(tmp: Path, name: str, process: subprocess.Popen, timeout: float = 120) -> dict:
    """The group's result ({losses, step, weights}) once its process ended well."""
    assert process.wait(timeout) == 0, (tmp / f"{name}.log").read_text()[-4000:]
    result = json.loads((tmp / f"{name}.result.json").read_text())
    return {**result, "weights": load_file(str(tmp / f"{name}.0"))}


@pytest.fixture
def meta_model():
    config, _ = resolve(llama_pretrain.recipe, ["debug"])
    return build_model_on_meta(config.model)


@pytest.mark.parametrize("env, options, expected", [
    ({"REPLICA_GROUP_ID": "0"}, {}, "no lighthouse; start one"),
    ({"TORCHFT_LIGHTHOUSE": "http://localhost:1"}, {}, "replica_id is None; give each replica group's job its index"),
    ({"TORCHFT_LIGHTHOUSE": "http://localhost:1", "REPLICA_GROUP_ID": "2"}, {}, "replica_id is '2'"),
    ({"TORCHFT_LIGHTHOUSE": "http://localhost:1"}, {"replica_id": 3, "replica_groups": 4, "lighthouse": None}, None),
])
def test_missing_options_are_one_message(monkeypatch, meta_model, env, options, expected):
    """Each option missing from both the plan and the environment is a MeshError naming both
    (the command line prints it as one line); options given are taken before any process group."""
    for name in ("TORCHFT_LIGHTHOUSE", "REPLICA_GROUP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plan = FaultTolerant(**options)
    if expected is None:
        assert (plan._replica_index(), plan._lighthouse_address()) == (3, "http://localhost:1")
        return
    monkeypatch.setattr(fault_tolerant, "_import_torchft", lambda: None)  # the options are checked first either way
    with pytest.raises(MeshError, match=re.escape(expected)) as raised:
        plan.apply(meta_model)
    assert "\n" not in str(raised.value)


def test_without_torchft_the_plan_says_how_to_install_it(monkeypatch, meta_model):
    monkeypatch.setitem(sys.modules, "torchft", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torchft.manager", None)
    with pytest.raises(MeshError, match=re.escape('pip install -e ".[ft]"')):
        FaultTolerant(replica_id=0, lighthouse="http://localhost:1").apply(meta_model)


@pytest.mark.slow
@needs_torchft
def test_two_groups_step_as_one_process_with_the_whole_batch(tmp_path):
    server, address = lighthouse(min_replicas=2)  # every step waits for both groups
    try:
        plan = "@torchft(dp_shard=2,replica_groups=2,min_replicas=2)"  # HSDP: 2 groups x 2 shards
        groups = [group(tmp_path, f"g{r}", r, address, plan, processes=2) for r in range(2)]
        losses, weights = straight_run()  # while the groups start
        results = [finished(tmp_path, f"g{r}", p) for r, p in enumerate(groups)]
    finally:
        server.kill()
    for result in results:
        assert result["step"] == STEPS
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5)
        assert result["weights"].keys() == weights.keys()
        for name, value in weights.items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert "fault tolerant (torchft): replica group 0 of 2" in (tmp_path / "g0.log").read_text()


@pytest.mark.slow
@needs_torchft
def test_a_killed_group_rejoins_with_the_live_state(tmp_path):
    server, address = lighthouse(min_replicas=1)
    steps, plan = 24, "@torchft(dp_shard=1,replica_groups=2,min_replicas=1,timeout=10)"
    try:
        # a group alone sleeps after each step, so the survivor is still training when the restarted group is up
        survivor = group(tmp_path, "survivor", 0, address, plan, steps=steps, alone_delay=1.0)
        doomed = group(tmp_path, "doomed", 1, address, plan, steps=steps, die_at=3)
        assert doomed.wait(120) == -signal.SIGKILL, (tmp_path / "doomed.log").read_text()[-4000:]
        assert survivor.poll() is None, "the survivor ended with the killed group"
        back = group(tmp_path, "back", 1, address, plan, steps=steps)
        kept, rejoined = finished(tmp_path, "survivor", survivor), finished(tmp_path, "back", back)
    finally:
        server.kill()
    alone, joined = (tmp_path / "survivor.log").read_text(), (tmp_path / "back.log").read_text()
    sizes = [int(n) for n in re.findall(r"quorum of (\d) of 2 replica groups", alone)]
    assert sizes[-3:] == [2, 1, 2], alone[-3000:]  # both, the survivor alone, both again
    assert re.search(r"torchft: joined at step (\d+) with the live state of a healthy replica group", joined), \
        joined[-3000:]
    # after the join the rejoined group reads on where the survivor's run does (sampling position, tokens)
    position = re.compile(r"ran step (\d+) data (\w+) tokens (\d+)")
    read = set(position.findall(joined))
    assert read and read <= set(position.findall(alone)), joined[-3000:]
    assert kept["step"] == rejoined["step"] == steps
    assert kept["losses"] == rejoined["losses"] and len(kept["losses"]) == steps
    for name, value in kept["weights"].items():
        assert torch.equal(rejoined["weights"][name], value), name
