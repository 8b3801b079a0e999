"""DDP communication hooks (fp16, PowerSGD, 1-bit with error feedback): the 1-bit compressor
against a naive implementation written here, each hook's reduced gradients and byte counts
on 2 processes (gloo) against what this file computes from every process's own gradients,
and short runs of the llama debug model through `parallel=@mesh(dp_replicate=2, comm_hook=...)`
against the same run with plain all-reduce."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.components.parallel.hooks.one_bit import compress, pack_signs, unpack_signs
from tessera.components.parallel.hooks.powersgd import PowerSGD

from helpers.forked_ranks import run_ranks
from helpers.launch import worker

STEPS = 30      # training steps of each end-to-end run
WARMUP = 10     # uncompressed steps of powersgd / one_bit in those runs (= the lr warmup)
RUNS = {
    "allreduce": "parallel=@mesh(dp_replicate=2)",
    "fp16": "parallel=@mesh(dp_replicate=2) parallel.comm_hook=@fp16",
    "powersgd": f"parallel=@mesh(dp_replicate=2) parallel.comm_hook=@powersgd parallel.comm_hook.rank=4 "
                f"parallel.comm_hook.start_iter={WARMUP}",
    "one_bit": f"parallel=@mesh(dp_replicate=2) parallel.comm_hook=@one_bit "
               f"parallel.comm_hook.warmup_steps={WARMUP}",
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One launch of 2 processes for the whole module (tests/helpers/workers/comm_hooks.py): the
    hooks' numerics on a small MLP, then the end-to-end runs (about 25 s on one thread per process)."""
    folder = tmp_path_factory.mktemp("comm_hooks")
    done = run_ranks(worker("comm_hooks"), str(folder / "results.pt"), str(STEPS), str(WARMUP), json.dumps(RUNS))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "results.pt")


# -- the 1-bit compressor, in one process ---------------------------------------------------------

def test_signs_pack_eight_to_a_byte_and_unpack():
    x = torch.randn(29, generator=torch.Generator().manual_seed(0))
    x[3] = 0.0  # zero counts as +
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (4,)
    for i in range(29):  # naive: bit i % 8 of byte i // 8
        assert (int(packed[i // 8]) >> (i % 8)) & 1 == int(x[i] >= 0)
    assert torch.equal(unpack_signs(packed, 29), torch.where(x >= 0, 1.0, -1.0))


def test_compression_error_is_carried_like_a_naive_error_feedback_loop():
    """Three steps of sign * mean|x| compression per piece with the residual carried, against
    the same loop written out here; the carried error keeps the sum of what was sent within
    one step's error of the sum of the true gradients."""
    gen = torch.Generator().manual_seed(1)
    lengths = [6, 10, 3]
    error, naive_error = torch.zeros(19), [torch.zeros(n) for n in lengths]
    sent_total, true_total = torch.zeros(19), torch.zeros(19)
    for _ in range(3):
        grad = torch.randn(19, generator=gen)
        corrected = grad + error
        packed, scales, decompressed = compress(corrected, lengths)
        error = corrected - decompressed
        naive_sent = []
        for i, piece in enumerate(grad.split(lengths)):
            c = piece + naive_error[i]
            q = torch.tensor([(1.0 if v >= 0 else -1.0) * c.abs().mean().item() for v in c])
            naive_error[i] = c - q
            naive_sent.append(q)
        torch.testing.assert_close(decompressed, torch.cat(naive_sent))
        torch.testing.assert_close(error, torch.cat(naive_error))
        torch.testing.assert_close(scales, torch.stack([s.abs().mean() for s in corrected.split(lengths)]))
        assert torch.equal(unpack_signs(packed, 19), torch.where(corrected >= 0, 1.0, -1.0))
        sent_total += decompressed
        true_total += grad
    torch.testing.assert_close(sent_total + error, true_total)  # nothing lost, only delayed


def test_warmup_too_short_for_bucket_rebuild_is_a_clear_error():
    from tessera.components.parallel.hooks.one_bit import OneBitCompression

    with pytest.raises(ValueError, match=r"one_bit.warmup_steps must be at least 2.*set one_bit.warmup_steps=2"):
        OneBitCompression(warmup_steps=1)
    with pytest.raises(ValueError, match=r"powersgd.start_iter must be at least 2"):
        PowerSGD(start_iter=1)


# -- the hooks in DDP on 2 processes --------------------------------------------------------------

def naive_one_bit(local: list[list[torch.Tensor]], warmup: int) -> list[list[torch.Tensor]]:
    """What every process should hold after each step: plain means for `warmup` steps, then
    the mean over processes of sign(c) * mean|c| per parameter, c = gradient + carried error."""
    errors = [torch.zeros_like(g) for g in local[0]]
    out = []
    for step, grads in enumerate(local):  # each grad: [world, *shape]
        if step < warmup:
            out.append([g.mean(0) for g in grads])
            continue
        reduced = []
        for i, g in enumerate(grads):
            c = g + errors[i]
            scale = c.flatten(1).abs().mean(1).view(-1, *[1] * (c.dim() - 1))
            q = torch.where(c >= 0, 1.0, -1.0) * scale
            errors[i] = c - q
            reduced.append(q.mean(0))
        out.append(reduced)
    return out


@pytest.mark.slow
def test_one_bit_hook_averages_compressed_gradients_with_error_feedback(two_processes):
    record = two_processes["numerics"]["one_bit"]
    expected = naive_one_bit(record["local"], warmup=2)
    for step, (got, want) in enumerate(zip(record["reduced"], expected, strict=True)):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    numel = sum(torch.Size(s).numel() for s in record["shapes"])
    assert record["bytes"][:2] == [numel * 4] * 2                              # warmup: fp32 all-reduce
    # after it: the bucket's signs packed 8 to a byte, plus one fp32 scale per parameter
    assert record["bytes"][2:] == [(numel + 7) // 8 + 4 * len(record["shapes"])] * 3  # (one bucket)


@pytest.mark.slow
def test_fp16_hook_sends_half_and_averages_to_fp16_precision(two_processes):
    record = two_processes["numerics"]["fp16"]
    numel = sum(torch.Size(s).numel() for s in record["shapes"])
    assert record["bytes"] == [numel * 2] * 5
    for got, local in zip(record["reduced"], record["local"], strict=True):
        for g, grads in zip(got, local, strict=True):
            exact = grads.mean(0)
            half = (grads.half() / 2).sum(0).float()  # what travels: each half-precision share
            torch.testing.assert_close(g, half, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(g, exact, rtol=2e-3, atol=1e-4)


@pytest.mark.slow
def test_powersgd_hook_sends_low_rank_factors_after_its_start(two_processes):
    """rank=1, start_iter=2: the first 2 steps all-reduce everything; then each weight matrix
    M (n x m) travels as P (n x 1) and Q (m x 1) and arrives with rank 1, while the biases
    (too small to gain) travel whole and arrive as the exact mean."""
    record = two_processes["numerics"]["powersgd"]
    numel = sum(torch.Size(s).numel() for s in record["shapes"])
    compressed = 0
    for shape in record["shapes"]:
        n, m = shape[0], torch.Size(shape[1:]).numel()
        compressed += (n + m) if (n + m) * 2.0 < n * m else n * m  # rank 1, min_compression_rate 2
    assert record["bytes"] == [numel * 4] * 2 + [compressed * 4] * 3
    for got, local in zip(record["reduced"][2:], record["local"][2:], strict=True):
        for g, grads in zip(got, local, strict=True):
            if g.dim() == 2:
                assert torch.linalg.matrix_rank(g) == 1
            else:
                torch.testing.assert_close(g, grads.mean(0))


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5  # one step's loss is noisy at 8 sequences


@pytest.mark.slow
@pytest.mark.parametrize(("name", "margin"), [("fp16", 0.02), ("powersgd", 0.1), ("one_bit", 0.2)])
def test_compressed_runs_converge_close_to_plain_all_reduce(two_processes, name, margin):
    """The llama debug model, 30 steps on 2 processes: the mean loss of the last 5 steps
    falls by more than 0.8 from the first and stays within `margin` of the plain all-reduce
    run's (measured: fp16 0.001, powersgd rank 4 0.005, one_bit 0.05)."""
    runs = two_processes["runs"]
    plain, run = runs["allreduce"]["losses"], runs[name]["losses"]
    assert run[0] == pytest.approx(plain[0])  # the same start
    assert _tail(run) < run[0] - 0.8
    assert abs(_tail(run) - _tail(plain)) < margin, (name, _tail(run), _tail(plain))


@pytest.mark.slow
def test_one_bit_sends_at_least_16x_fewer_bytes_per_compressed_step(two_processes):
    runs = two_processes["runs"]
    full = runs["one_bit"]["param_bytes"]  # what plain all-reduce hands over per step (fp32)
    compressed_steps = STEPS - WARMUP
    per_step = (runs["one_bit"]["bytes"] - WARMUP * full) / compressed_steps
    assert full / per_step >= 16, full / per_step
    assert runs["fp16"]["bytes"] == STEPS * full // 2
    assert runs["powersgd"]["bytes"] < (WARMUP + compressed_steps / 4) * full  # rank 4: far below full
