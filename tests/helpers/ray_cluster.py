"""A throwaway Ray cluster of several nodes on this machine, for tests of the Ray data engine.

`ray start --head` and `ray start --address=...` leave their processes running after the
command returns; `stop` ends exactly those (every process whose command line names the
cluster's temp folder or GCS port, and their descendants: the workers, the agents), not
every Ray process of this user as `ray stop` would, so another cluster on the machine
survives. Linux only (it reads /proc).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


class RayUnavailable(RuntimeError):
    """Ray could not start a cluster here (the message says why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class LocalRayCluster:
    """`nodes` Ray nodes of `cpus_per_node` CPUs each, all on this machine."""

    nodes: int = 2
    cpus_per_node: int = 1
    port: int = dataclasses.field(default_factory=free_port)
    # a short folder: Ray's socket paths (AF_UNIX, at most 107 bytes) live under it
    temp_dir: str = dataclasses.field(default_factory=lambda: tempfile.mkdtemp(prefix="ray", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the head and the other nodes; raises RayUnavailable with Ray's own message."""
        common = [f"--num-cpus={self.cpus_per_node}", "--disable-usage-stats", "--object-store-memory=100000000"]
        # every port a second head on this machine would also want by default gets a free one
        head = [RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false", f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}", *common]
        self._ray(head)
        for _ in range(self.nodes - 1):
            self._ray([RAY, "start", f"--address={self.address}", *common])

    def _ray(self, command: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RayUnavailable(f"`{' '.join(command[1:3])}`: {e}") from e
        if done.returncode:
            raise RayUnavailable(f"`{' '.join(command[1:3])}` failed ({done.returncode}): "
                                 + (done.stderr or done.stdout)[-2000:])

    def alive_nodes(self) -> list[dict]:
        """`ray.nodes()` of the alive nodes, asked from a child process (whose RAY_ADDRESS names
        this cluster) so that this process stays unconnected."""
        code = ("import json, ray; ray.init(logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))")
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "RAY_ADDRESS": self.address})
        except subprocess.TimeoutExpired as e:
            raise RayUnavailable(f"no answer from {self.address} in {e.timeout} s") from e
        if done.returncode:
            raise RayUnavailable(f"could not connect to {self.address}: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGKILL every process of this cluster (what `ray stop --force` does to all of them)."""
        mine = {pid for pid, args in _processes().items()
                if any(a.endswith((self.temp_dir, f":{self.port}")) or f"{self.temp_dir}/" in a for a in args)}
        for _ in range(3):  # the raylets' children: workers, agents (and theirs)
            mine |= {pid for pid, parent in _parents().items() if parent in mine}
        mine.discard(os.getpid())
        for pid in mine:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid)
                                                  for pid in mine):
            time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _processes() -> dict[int, list[str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                pass
    return out


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def actor_nodes(class_name: str) -> Counter:
    """How many actors of class `class_name` (alive or finished) each node id ran, from the
    cluster's actor table (this process must be connected). `ray._private.state` reads the
    GCS directly; the public `ray.util.state` needs the dashboard, which the test cluster omits."""
    from ray._private import state

    return Counter(a["Address"]["NodeID"] for a in state.actors().values() if a["ActorClassName"] == class_name)
