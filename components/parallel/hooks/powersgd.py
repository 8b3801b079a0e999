"""PowerSGD (Vogels et al., arXiv:1905.13727): torch's `powerSGD_hook`, with the bytes it sends counted."""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from tessera.components.interfaces import CommHook
from tessera.components.parallel.hooks.bucket_state import BucketState
from tessera.registry.kinds import COMM_HOOK


@COMM_HOOK.register("powersgd")
class PowerSGD(CommHook):
    """Low-rank gradient compression: each weight matrix's gradient M (n x m) is sent as two
    factors P (n x rank) and Q (m x rank) found by one step of power iteration (warm-started
    from the previous step's Q), with the compression error fed back into the next step.
    Vectors and matrices too small to gain (`(n + m) * rank * min_compression_rate >= n * m`)
    are all-reduced uncompressed; the first `start_iter` steps are plain all-reduce. On CPU
    (gloo) each bucket finishes before the next starts, so communication does not overlap
    the backward pass there.

    Uses torch's `ddp_comm_hooks.powerSGD_hook` (`PowerSGDState` + `powerSGD_hook`); this class
    adds the configuration and counts `bytes_sent` from the state's own element counts
    (P, Q and the uncompressed tensors once compressing, the whole bucket before).

    Args:
        rank: the factors' rank (torch's `matrix_approximation_rank`); higher is closer to
            the true gradient and sends more.
        start_iter: plain all-reduce steps before compressing (at least 2: DDP rebuilds its
            buckets after the first step, and the error feedback is kept per bucket).
        min_compression_rate: compress a matrix only if it shrinks by more than this factor.
        error_feedback: add the previous step's compression error to this step's gradient.
        warm_start: start each power iteration from the previous step's Q.
        seed: seed of the random initial Q (the same on every process).
    """

    def __init__(self, *, rank: int = 2, start_iter: int = 10, min_compression_rate: float = 2.0,
                 error_feedback: bool = True, warm_start: bool = True, seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"powersgd.rank must be at least 1, got {rank}")
        if start_iter < 2 and (error_feedback or warm_start):
            raise ValueError(
                f"powersgd.start_iter must be at least 2 with error_feedback or warm_start (got "
                f"{start_iter}): DDP rebuilds its gradient buckets after the first step, and both "
                "keep state per bucket; set powersgd.start_iter=2 or more")
        self.rank = rank
        self.start_iter = start_iter
        self.min_compression_rate = min_compression_rate
        self.error_feedback = error_feedback
        self.warm_start = warm_start
        self.seed = seed
        self.bytes_sent = 0
        self.state: torch_powersgd.PowerSGDState | None = None
        self.buckets = BucketState({"error": self._elements, "p": lambda names: self._factors(names, 0),
                                    "q": lambda names: self._factors(names, 1)})

    def register(self, ddp: nn.Module, process_group: Any) -> None:
        self.state = torch_powersgd.PowerSGDState(
            process_group=process_group, matrix_approximation_rank=self.rank,
            start_powerSGD_iter=self.start_iter, min_compression_rate=self.min_compression_rate,
            use_error_feedback=self.error_feedback, warm_start=self.warm_start, random_seed=self.seed)
        self.buckets.bind(ddp)
        # torch's hook reads and writes these dicts; `buckets` keeps them matched to the buckets
        self.state.error_dict = self.buckets.tables["error"]
        self.state.p_memory_dict = self.buckets.tables["p"]
        self.state.q_memory_dict = self.buckets.tables["q"]
        ddp.register_comm_hook(self, _powersgd_hook)

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: the step count, the error feedback and the last P and
        Q factors (warm start) cut per parameter name (`BucketState`), the generator of the
        random initial Q, and the byte counters. Tensors are this process's own."""
        if self.state is None:
            return {}
        kind, keys, position, has_gauss, gauss = self.state.rng.get_state()
        return {"iter": self.state.iter, "bytes_sent": self.bytes_sent,
                "numel_before": self.state.total_numel_before_compression,
                "numel_after": self.state.total_numel_after_compression,
                "rng": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "position": int(position),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "pieces": self.buckets.pieces()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (after `register`, before the first step)."""
        if not state or self.state is None:
            return
        self.state.iter, self.bytes_sent = state["iter"], state["bytes_sent"]
        self.state.total_numel_before_compression = state["numel_before"]
        self.state.total_numel_after_compression = state["numel_after"]
        rng = state["rng"]
        self.state.rng.set_state((rng["kind"], rng["keys"].numpy().astype("uint32"), rng["position"],
                                  rng["has_gauss"], rng["gauss"]))
        self.buckets.load(state["pieces"])

    def _elements(self, names: list[str]) -> list[tuple[str, int]]:
        return [(name, self.buckets.shapes[name].numel()) for name in names]

    def _factors(self, names: list[str], side: int) -> list[tuple[str, int]]:
        """(name, elements of its P (side 0) or Q (side 1) factor) for the bucket's matrices
        torch's hook compresses, in the order it lays them out: grouped by shape, shapes in
        order of first appearance."""
        by_shape: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for name in names:
            shape = self.buckets.shapes[name]
            n = shape[0] if len(shape) else 1
            m = shape.numel() // n
            rank = min(n, m, self.rank)
            if torch_powersgd._should_compress(n, m, rank, self.min_compression_rate)[0]:
                by_shape.setdefault((n, m), []).append((name, (n, m)[side] * rank))
        return [piece for pieces in by_shape.values() for piece in pieces]


def _powersgd_hook(hook: PowerSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state = hook.state
    assert state is not None
    buffer = bucket.buffer()
    hook.buckets.align(bucket)
    if state.iter < state.start_powerSGD_iter:  # torch's hook all-reduces the whole bucket
        hook.bytes_sent += buffer.numel() * buffer.element_size()
        return torch_powersgd.powerSGD_hook(state, bucket)
    # Compressing: the hook adds the elements it sends (P, Q and the uncompressed tensors)
    # to this counter before it returns (the collectives themselves run in the future).
    before = state.total_numel_after_compression
    future = torch_powersgd.powerSGD_hook(state, bucket)
    hook.bytes_sent += (state.total_numel_after_compression - before) * buffer.element_size()
    if buffer.device.type == "cpu":
        # torch's hook issues a bucket's P and Q all-reduces from callbacks; gloo runs those
        # whenever the previous collective finishes, so with several buckets in flight two
        # processes can issue collectives in different orders (a size mismatch that aborts).
        # Finishing each bucket before DDP hands over the next keeps the order fixed.
        future.wait()
    return future
