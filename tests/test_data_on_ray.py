"""The sharded preparation on a two-node Ray cluster (both nodes on this machine, so they
share the prepared folder as a cluster's nodes share a network file system): the same token
files and report as on this machine's local engine, with the tasks spread over both nodes."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

import tessera.components.builtin  # noqa: E402,F401
from tessera.components.data.engine import LocalEngine, RayEngine  # noqa: E402

from helpers.ray_cluster import LocalRayCluster, RayUnavailable, actor_nodes  # noqa: E402
from helpers.sharded_corpus import pipeline, write_corpus  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the test cluster is found via /proc")]


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node of one CPU each; every process of it ends after the module."""
    import ray

    cluster = LocalRayCluster(nodes=2, cpus_per_node=1)
    try:
        try:
            cluster.start()
            nodes = cluster.alive_nodes()
        except RayUnavailable as e:
            pytest.skip(f"Ray cannot start a cluster here: {e}")
        assert len(nodes) == 2, nodes
        assert len({n["NodeID"] for n in nodes}) == 2
        yield cluster
    finally:
        ray.shutdown()  # the engine connected this process
        cluster.stop()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_cluster_prepares_the_same_data_as_this_machine(cluster, tmp_path):
    write_corpus(tmp_path / "corpus", files=2)  # 2 shards: the clean and tokenize stages have a task per node
    local = pipeline(tmp_path / "corpus", tmp_path / "local")
    local.engine = LocalEngine(workers=1)
    on_ray = pipeline(tmp_path / "corpus", tmp_path / "ray")
    on_ray.engine = RayEngine(address=cluster.address)
    local_report, ray_report = local.prepare(), on_ray.prepare()

    assert on_ray.folder.name == local.folder.name  # the engine is not part of the fingerprint
    local_tokens, ray_tokens = checksums(local.folder / "tokens"), checksums(on_ray.folder / "tokens")
    assert any(name.endswith(".bin") for name in ray_tokens)
    assert ray_tokens == local_tokens  # every (domain, split)'s token files, byte for byte
    assert checksums(on_ray.folder / "tokenizer") == checksums(local.folder / "tokenizer")
    assert [(r.stage, r.domain, r.docs_out) for r in ray_report] == [(r.stage, r.domain, r.docs_out)
                                                                     for r in local_report]  # kept documents
    assert ray_report == local_report  # and every other count of the report

    # datatrove runs each task in an actor of class RankWorker: both nodes ran some
    import ray

    ran = actor_nodes("RankWorker")
    assert set(ran) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, ran  # the engine connected this process
    assert len(ran) == 2


def test_a_failed_task_fails_the_stage_as_on_this_machine(cluster, tmp_path):
    def odd_ranks_fail(data, rank, world_size):  # nested: pickled by value to the workers
        if rank % 2:
            raise RuntimeError(f"task {rank} fails on purpose")
        return data

    with pytest.raises(RuntimeError):  # LocalEngine raises the task's own error
        LocalEngine(workers=1).run(steps=[odd_ranks_fail], tasks=2, logs=str(tmp_path / "local"), name="fail")
    with pytest.raises(RuntimeError):
        RayEngine(address=cluster.address).run(steps=[odd_ranks_fail], tasks=2, logs=str(tmp_path / "ray"),
                                               name="fail")
    assert not (tmp_path / "ray" / "completions" / "00001").exists()
