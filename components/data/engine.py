"""Where data preparation runs: datatrove's executors on this machine, a Ray cluster or Slurm.

Every stage of the preparation (see `tessera.components.data.stages`) is a datatrove pipeline
run as `tasks` independent tasks; an engine hands those tasks to one of datatrove's executors.
Each executor marks a finished task in `{logs}/completions/`, so a stage cut short (a kill,
a lost node) runs only its unfinished tasks when started again, and every task writes its
outputs under names fixed by its rank, so the result is the same on any engine and for any
number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tessera.components.interfaces import DataEngine
from tessera.registry.kinds import DATA_ENGINE


@contextlib.contextmanager
def _quiet_driver() -> Iterator[None]:
    """Silence datatrove's progress lines in this process while a stage runs: the pipeline
    prints its own progress and report, and each task still logs in full to
    `{logs}/logs/task_NNNNN.log` (tasks run in worker processes, where this does not reach)."""
    from loguru import logger

    logger.disable("datatrove")
    try:
        yield
    finally:
        logger.enable("datatrove")


def _local_executor_class() -> type:
    from datatrove.executor.local import LocalPipelineExecutor

    class QuietLocalExecutor(LocalPipelineExecutor):
        """datatrove's local executor whose tasks log only errors to the console (every
        task logs in full to its file): datatrove prints INFO lines for the first worker."""

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
            return super()._run_for_rank(rank, local_rank + 1, node_rank)

    return QuietLocalExecutor


@DATA_ENGINE.register("local")
@dataclasses.dataclass(kw_only=True)
class LocalEngine(DataEngine):
    """This machine: up to `workers` tasks at once in worker processes (datatrove's local
    executor); a stage with one task, or with less input than `in_process_below`, runs its
    tasks one after another in this process, where starting workers would cost more (about a
    second a stage) than they save.

    Args:
        workers: most tasks running at once; 0: one per CPU core this process may use.
        in_process_below: input bytes under which a stage runs in this process.
    """

    workers: int = 0
    in_process_below: int = 64 << 20

    def worker_count(self, tasks: int, input_bytes: int) -> int:
        if input_bytes < self.in_process_below:
            return 1
        return min(self.workers or len(os.sched_getaffinity(0)), tasks)

    def run(self, *, steps: list[Any], tasks: int, logs: str, name: str, input_bytes: int = 0) -> None:
        import multiprocess.forkserver

        # Worker processes fork from a server that has imported the stages (and torch, through
        # the interfaces) once, instead of importing them again for every stage's pool; and
        # they need not import the caller's __main__ (dill sends what it defines by value).
        multiprocess.forkserver.set_forkserver_preload(["tessera.components.data.preparation"])
        workers = self.worker_count(tasks, input_bytes)
        executor = _local_executor_class()(pipeline=steps, tasks=tasks, workers=workers, logging_dir=logs,
                                           skip_completed=True, start_method="forkserver")
        with _quiet_driver():
            if workers > 1:
                executor.run()
            else:  # datatrove's own per-task method, without the process manager run() starts
                for rank in executor.get_incomplete_ranks():
                    executor._run_for_rank(rank, local_rank=1)


@DATA_ENGINE.register("ray")
@dataclasses.dataclass(kw_only=True)
class RayEngine(DataEngine):
    """A Ray cluster (datatrove's Ray executor): one task per `cpus_per_task` CPUs anywhere on
    the cluster. The prepared folder (`data.data_dir`) must be on a file system every node
    sees (NFS, Lustre; one machine trivially), since tasks write their outputs there.

    Args:
        address: the cluster to join ("auto": the one `ray start` made on this machine; None:
            a new single-machine Ray); ignored when this process is already connected.
        workers: tasks running at once across the cluster (-1: all).
        cpus_per_task, mem_per_cpu_gb: each task's reservation on its node.
    """

    address: str | None = "auto"
    workers: int = -1
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0

    def run(self, *, steps: list[Any], tasks: int, logs: str, name: str, input_bytes: int = 0) -> None:
        import ray
        from datatrove.executor.ray import RayPipelineExecutor

        if not ray.is_initialized():
            _keeping_signal_handlers(lambda: ray.init(address=self.address, log_to_driver=False, logging_level="ERROR",
                                                      runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}))
        with _quiet_driver():  # also its warning, once a stage, that `logs` is a local path
            executor = RayPipelineExecutor(pipeline=steps, tasks=tasks, workers=self.workers, logging_dir=logs,
                                           skip_completed=True, cpus_per_task=self.cpus_per_task,
                                           mem_per_cpu_gb=self.mem_per_cpu_gb)
            executor.run()
        # datatrove's Ray executor only logs failed tasks; the next stage would read missing files
        failed = executor.get_incomplete_ranks(range(tasks))
        if failed:
            raise RuntimeError(f"data: {len(failed)} of {tasks} {name} tasks failed on Ray; the first one's log: "
                               f"{logs}/logs/task_{failed[0]:05d}.log")


@DATA_ENGINE.register("slurm")
@dataclasses.dataclass(kw_only=True)
class SlurmEngine(DataEngine):
    """A Slurm cluster (datatrove's Slurm executor): each stage becomes a job array of its
    tasks, queued behind the previous stage's job with `afterok`. Queuing returns at once:
    run the same command again when the jobs have finished (`squeue --me` is empty) and it
    loads the prepared data; `{logs}/launch_script.slurm` is the sbatch script each stage wrote.

    Args:
        partition: the Slurm partition. time: each task's limit ("HH:MM:SS").
        workers: array tasks running at once (-1: no limit). cpus_per_task, mem_per_cpu_gb:
        each task's reservation. sbatch_args: extra `#SBATCH` options (e.g. {"account": "x"}).
        venv_path: the `activate` script the nodes source (default: this interpreter's
            virtualenv's, when it runs in one).
    """

    waits = False

    partition: str
    time: str = "4:00:00"
    workers: int = -1
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    sbatch_args: dict[str, str] = dataclasses.field(default_factory=dict)
    venv_path: str | None = None
    _previous: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def run(self, *, steps: list[Any], tasks: int, logs: str, name: str, input_bytes: int = 0) -> None:
        from datatrove.executor.slurm import SlurmPipelineExecutor

        executor = SlurmPipelineExecutor(
            pipeline=steps, tasks=tasks, workers=self.workers, logging_dir=logs, job_name=f"tessera-{name}",
            partition=self.partition, time=self.time, cpus_per_task=self.cpus_per_task,
            mem_per_cpu_gb=self.mem_per_cpu_gb, sbatch_args=self.sbatch_args, depends=self._previous,
            venv_path=self.venv_path or _this_venv(), skip_completed=True)
        executor.run()
        self._previous = executor


def _this_venv() -> str | None:
    """This interpreter's virtualenv's activate script (datatrove's job script sources the path)."""
    if sys.prefix == sys.base_prefix:
        return None
    return str(Path(sys.prefix) / "bin" / "activate")


def _keeping_signal_handlers(start: Any) -> None:
    """Call `start` and put back the SIGTERM / SIGINT handlers it replaced: `ray.init` installs
    its own, which would outlive the preparation and take over the training run's (a
    preempted run saves its step on SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        start()
        return
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    start()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
