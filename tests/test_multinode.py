"""Two "nodes" on this machine train exactly as one node of the same world size.

The reference is the single-node launch every other multi-process test uses, `torchrun
--standalone --nproc-per-node 2`; against it, the llama debug recipe (FSDP over 2 ranks) is
started as a user starts it on two hosts:
- two `torchrun --nnodes 2 --node-rank i --nproc-per-node 1` meeting at a c10d rendezvous;
- two plain `python` processes with the variables `srun` sets (SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID) and no torchrun, which must derive the
  rendezvous themselves (`tessera.components.parallel.slurm_env`).
Each must log the same loss at every step, to the last bit, and print the same done line.
Nodes need not share a file system: each node prepares its own copy of the data (checked below
with a stand-in corpus, as a real preparation twice over would be slow).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.components.parallel.slurm_env import PORT_BASE, PORT_SPAN
from tessera.components.train.assemble import _prepare_once

from helpers.launch import ROOT, environment, recipe_script, torchrun

ARGS = ["debug", "steps=4", "batch_size=2", "seq_len=32", "compute.threads=1", "parallel=@fsdp", "precision=@fp32",
        "checkpoint=None", "metrics.eval_every=1000", "metrics.plots=False", "metrics.tensorboard=False",
        "progress.log_every=1"]
TIMEOUT = 300  # generous: the machine's 2 cores are shared


def free_port(low: int = 0, high: int = 0) -> int:
    """A port nothing listens on now (in [low, high) when given)."""
    for port in (range(low, high) if high else [0]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high})")


def losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def done_line(text: str) -> str:
    """The run's last line without its timing (`done: loss A -> B (val C) in 4 steps`)."""
    line = re.search(r"^done: .*$", text, re.MULTILINE)
    assert line, text[-3000:]
    return line.group(0).split(" steps,")[0]


def wait_all(procs: list[subprocess.Popen[str]]) -> str:
    """Wait for every process; everything they printed. Fails naming the exit statuses."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    statuses = [p.returncode for p in procs]
    assert statuses == [0] * len(procs), "\n\n".join(o[-3000:] for o in outputs)
    return "\n".join(outputs)


def launch(commands: list[list[str]], envs: list[dict[str, str]]) -> str:
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=environment({"COLUMNS": "200", **env}), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for cmd, env in zip(commands, envs, strict=True)]
    return wait_all(procs)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[int, float]], str]:
    """The reference: `torchrun --standalone --nproc-per-node 2`; (losses, done line)."""
    folder = tmp_path_factory.mktemp("standalone")
    done = torchrun(recipe_script("llama_pretrain"), *ARGS, f"metrics.folder={folder}", timeout=TIMEOUT,
                    env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(folder), done_line(done.stdout)


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node(one_node: tuple[list[tuple[int, float]], str], tmp_path: Path) -> None:
    port = free_port()
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=multinode-{port}",
              str(recipe_script("llama_pretrain")), *ARGS, f"metrics.folder={tmp_path}"] for i in range(2)]
    printed = launch(nodes, [{}, {}])
    reference, reference_done = one_node
    assert [step for step, _ in reference][:4] == [1, 2, 3, 4]  # a loss logged at every step
    assert losses(tmp_path) == reference
    assert done_line(printed) == reference_done


@pytest.mark.slow
def test_srun_tasks_without_torchrun_equal_one_node(one_node: tuple[list[tuple[int, float]], str],
                                                   tmp_path: Path) -> None:
    port = free_port(PORT_BASE, PORT_BASE + PORT_SPAN)
    job_id = str(port - PORT_BASE + 7 * PORT_SPAN)  # a job id whose derived port is free now
    tasks = [{"SLURM_PROCID": str(i), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(i), "SLURM_JOB_ID": job_id,
              "SLURM_JOB_NODELIST": "localhost"} for i in range(2)]
    command = [sys.executable, str(recipe_script("llama_pretrain")), *ARGS, f"metrics.folder={tmp_path}"]
    printed = launch([command, command], tasks)
    reference, reference_done = one_node
    assert losses(tmp_path) == reference
    assert done_line(printed) == reference_done


class NodeLocalData:
    """Stands in for a corpus prepared into a folder only this node sees: counts preparations,
    and fails (instead of hanging) when polled for a copy nobody here is preparing."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.preparations, self.polls = folder, 0, 0

    def prepared(self) -> bool:
        self.polls += 1
        if self.polls > 3:
            raise TimeoutError(f"waited for {self.folder}, which no process of this node prepares")
        return (self.folder / "report.json").exists()

    def prepare(self) -> None:
        self.preparations += 1
        self.folder.mkdir(exist_ok=True)
        (self.folder / "report.json").write_text("{}")


def test_each_node_prepares_its_own_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first process of the second node (RANK 1, LOCAL_RANK 0) cannot wait for rank 0's copy,
    which lies on another host: it prepares its own."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    second_node = NodeLocalData(tmp_path / "node1")
    _prepare_once(second_node, rank=1)
    assert second_node.preparations == 1 and (tmp_path / "node1" / "report.json").exists()


def test_other_processes_of_a_node_load_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    data = NodeLocalData(tmp_path / "node0")
    with pytest.raises(TimeoutError):  # nothing prepared on this node yet: it waits, never prepares itself
        _prepare_once(data, rank=3)
    assert data.preparations == 0
    NodeLocalData(tmp_path / "node0").prepare()  # the node's first process finished
    data.polls = 0
    _prepare_once(data, rank=3)
    assert data.preparations == 1  # prepare() on a prepared folder: loads it
