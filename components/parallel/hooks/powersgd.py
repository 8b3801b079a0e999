"""PowerSGD (Vogels et al., arXiv:1905.13727): torch's `powerSGD_hook`, with the bytes it sends counted."""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from tessera.components.interfaces import CommHook
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

    def register(self, ddp: nn.Module, process_group: Any) -> None:
        self.state = torch_powersgd.PowerSGDState(
            process_group=process_group, matrix_approximation_rank=self.rank,
            start_powerSGD_iter=self.start_iter, min_compression_rate=self.min_compression_rate,
            use_error_feedback=self.error_feedback, warm_start=self.warm_start, random_seed=self.seed)
        ddp.register_comm_hook(self, _powersgd_hook)


def _powersgd_hook(hook: PowerSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state = hook.state
    assert state is not None
    buffer = bucket.buffer()
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
