"""1-bit gradient compression with error feedback, after an uncompressed warmup.

The idea of 1-bit Adam (Tang et al., arXiv:2102.02888): communicate at full precision while
training is unstable, then send one bit per element (its sign) plus one scale per tensor,
and carry what the compression dropped into the next step, so that no part of the gradient
is lost, only delayed. 1-bit Adam compresses Adam's momentum after freezing its variance;
as a DDP hook this compresses the gradient itself (error-feedback sign compression with a
mean-magnitude scale, Karimireddy et al., arXiv:1901.09847, §3), leaving the optimizer alone.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from tessera.components.interfaces import CommHook
from tessera.components.parallel.hooks.bucket_state import BucketState
from tessera.registry.kinds import COMM_HOOK

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element of the 1-D tensor `x` (1 where x >= 0), eight to a byte, the first
    element in the lowest bit: uint8 of shape (ceil(n / 8),)."""
    bits = (x >= 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, -x.numel() % 8)).view(-1, 8)
    return (bits * _BIT_WEIGHTS.to(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_signs` for the leading dimensions of `packed` (..., ceil(n / 8)):
    +1.0 / -1.0 (fp32) of shape (..., n)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :n].float() * 2 - 1


def compress(corrected: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign + scale compression of a flat fp32 tensor made of consecutive pieces of `lengths`
    (one per parameter): each piece becomes sign(x) * mean|x| over that piece (x >= 0 counts
    as +). Returns (packed signs uint8 (ceil(n / 8),), scales fp32 (len(lengths),),
    the decompressed tensor fp32 (n,)); `corrected - decompressed` is the error to carry."""
    scales = torch.stack([piece.abs().mean() for piece in corrected.split(lengths)])
    signs = torch.where(corrected >= 0, 1.0, -1.0)
    decompressed = signs * scales.repeat_interleave(torch.tensor(lengths, device=corrected.device))
    return pack_signs(corrected), scales, decompressed


@COMM_HOOK.register("one_bit")
class OneBitCompression(CommHook):
    """Plain all-reduce for the first `warmup_steps` steps; after that each process adds the
    error it carried from its previous step to its gradient bucket, sends the signs (packed,
    8 per byte) and one fp32 scale per parameter (mean |gradient| over it) to every other
    process (all-gather), keeps `corrected - sign * scale` as its new error, and every
    process averages the decompressed gradients of all processes: 1/32 of an fp32
    all-reduce's payload, plus 4 bytes per parameter tensor.

    Args:
        warmup_steps: uncompressed steps first (at least 2: DDP rebuilds its gradient buckets
            after the first step, and the error is kept per bucket). 1-bit Adam warms up for
            about 15-25% of training; on short runs keep it to the learning-rate warmup or more.
    """

    def __init__(self, *, warmup_steps: int = 100) -> None:
        if warmup_steps < 2:
            raise ValueError(
                f"one_bit.warmup_steps must be at least 2 (got {warmup_steps}): DDP rebuilds its "
                "gradient buckets after the first step and the carried error is kept per bucket; "
                "set one_bit.warmup_steps=2 or more")
        self.warmup_steps = warmup_steps
        self.bytes_sent = 0
        self.steps = 0  # DDP iterations whose gradients were communicated
        self.buckets = BucketState({"error": lambda names: [(n, self.buckets.shapes[n].numel()) for n in names]})
        self.errors: dict[int, torch.Tensor] = self.buckets.tables["error"]  # bucket index -> carried error (fp32)
        self.process_group: Any = None

    def register(self, ddp: nn.Module, process_group: Any) -> None:
        self.process_group = process_group
        self.buckets.bind(ddp)
        ddp.register_comm_hook(self, _one_bit_hook)

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: steps communicated, bytes sent, and the carried error
        (this process's own) cut per parameter name (`BucketState`)."""
        return {"steps": self.steps, "bytes_sent": self.bytes_sent, "pieces": self.buckets.pieces()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (after `register`, before the first step)."""
        if not state:
            return
        self.steps, self.bytes_sent = state["steps"], state["bytes_sent"]
        self.buckets.load(state["pieces"])

    def _count_step(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():  # DDP communicates bucket 0 last in every iteration
            self.steps += 1


def _one_bit_hook(state: OneBitCompression, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.buckets.align(bucket)
    if state.steps < state.warmup_steps:
        state.bytes_sent += buffer.numel() * buffer.element_size()
        state._count_step(bucket)
        return default_hooks.allreduce_hook(state.process_group, bucket)

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = group.size()
    n = buffer.numel()
    lengths = [g.numel() for g in bucket.gradients()]
    error = state.errors.get(bucket.index())
    corrected = buffer.float() if error is None or error.numel() != n else buffer.float() + error
    packed, scales, decompressed = compress(corrected, lengths)
    state.errors[bucket.index()] = corrected - decompressed
    payload = torch.cat([packed, scales.view(torch.uint8)])  # one collective: bits, then scales
    state.bytes_sent += payload.numel()
    gathered = torch.empty(world_size * payload.numel(), dtype=torch.uint8, device=buffer.device)
    future = dist.all_gather_single(gathered, payload, group=group, async_op=True).get_future()
    state._count_step(bucket)
    n_packed = packed.numel()
    counts = torch.tensor(lengths, device=buffer.device)

    def average(_: torch.futures.Future) -> torch.Tensor:
        rows = gathered.view(world_size, -1)
        signs = unpack_signs(rows[:, :n_packed], n)                       # (world, n)
        all_scales = rows[:, n_packed:].contiguous().view(torch.float32)  # (world, n_params)
        mean = (signs * all_scales.repeat_interleave(counts, dim=1)).mean(dim=0)
        buffer.copy_(mean)
        return buffer

    return future.then(average)
