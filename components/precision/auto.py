"""Precision `auto`: bf16 autocast where the device runs bf16 matmuls faster than fp32, fp32
elsewhere, and a warning when a run asks for a half precision the device runs slowly.

The decision reads the device's capability (CUDA: `torch.cuda.is_bf16_supported()`; x86
CPUs: AMX tiles or AVX512-BF16, which give a native bf16 dot product) and confirms it with
the cached, time-boxed matmul probe of `tessera.components.precision.probe`. On CPUs without those
instructions (AMD Zen 2 and 3, Intel before Cooper Lake) oneDNN emulates
bf16 and runs it tens of times slower than fp32, so fp32 is both faster and exact there.

`TESSERA_FAST_BF16=1` / `=0` forces the capability either way (tests, or a machine whose
probe misleads); the choice then says it was forced.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import torch
from torch import nn

from tessera.components.interfaces import DryRunError, ElementBytes, PrecisionPolicy
from tessera.components.precision.policies import FP32, BF16Autocast
from tessera.components.precision.probe import matmul_flops
from tessera.registry.kinds import PRECISION

FORCE_ENV = "TESSERA_FAST_BF16"
PROBE_BUDGET_S = 0.15  # per dtype; cached after the first run on a machine


class SlowPrecisionWarning(UserWarning):
    """A run computes in a dtype this device runs slower than fp32."""


@dataclasses.dataclass(frozen=True)
class Capability:
    """Whether `dtype` has native fast matmuls on a device, and the evidence."""

    native: bool
    why: str
    forced: bool = False
    """Set by `TESSERA_FAST_BF16` rather than read off the device."""


def capability(dtype: torch.dtype, device: str) -> Capability:
    """Does `device` have native `dtype` (bf16 / fp16) matmul instructions? Honours `TESSERA_FAST_BF16`
    for bf16."""
    forced = os.environ.get(FORCE_ENV)
    if dtype == torch.bfloat16 and forced in ("0", "1"):
        return Capability(forced == "1", f"forced by {FORCE_ENV}={forced}", forced=True)
    dev = torch.device(device)
    if dev.type == "cuda":
        if dtype == torch.bfloat16:
            ok = torch.cuda.is_bf16_supported()
            return Capability(ok, f"{torch.cuda.get_device_name(dev)} {'has' if ok else 'lacks'} bf16 tensor cores")
        return Capability(True, f"{torch.cuda.get_device_name(dev)} has fp16 tensor cores")
    if dev.type != "cpu":
        return Capability(False, f"unknown device type {dev.type!r}")
    if dtype == torch.bfloat16:
        if torch.cpu._is_amx_tile_supported():
            return Capability(True, "this CPU has AMX")
        if torch.cpu._is_avx512_bf16_supported():
            return Capability(True, "this CPU has AVX512-BF16")
        return Capability(False, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AMX or AVX512-BF16")
    if dtype == torch.float16:
        ok = torch.cpu._is_amx_fp16_supported()
        return Capability(ok, "this CPU has AMX-FP16" if ok else "this CPU has no AMX-FP16")
    return Capability(True, "fp32")


def speedup(dtype: torch.dtype, device: str) -> float:
    """How many times faster `dtype` matmuls run than fp32 on `device` (below 1: slower),
    from the cached, time-boxed probe."""
    return matmul_flops(dtype, device=device, budget_s=PROBE_BUDGET_S) / \
        matmul_flops(torch.float32, device=device, budget_s=PROBE_BUDGET_S)


def _ratio_text(ratio: float, dtype_name: str, where: str) -> str:
    if ratio >= 1:
        return f"{dtype_name} matmul is {ratio:.1f}x faster than fp32 {where}"
    return f"{dtype_name} matmul is {1 / ratio:.0f}x slower than fp32 {where}"


def _where(device: str) -> str:
    return "on this CPU" if torch.device(device).type == "cpu" else f"on {device}"


def choose(device: str) -> tuple[PrecisionPolicy, str]:
    """The policy `auto` resolves to on `device`, and a one-line reason."""
    cap = capability(torch.bfloat16, device)
    if cap.forced:
        return (BF16Autocast(), f"bf16 autocast ({cap.why})") if cap.native else (FP32(), f"fp32 ({cap.why})")
    ratio = speedup(torch.bfloat16, device)
    measured = _ratio_text(ratio, "bf16", _where(device))
    if not cap.native:
        return FP32(), f"fp32 — {cap.why}; {measured}"
    if ratio < 1.0:  # the instructions exist but this build / VM does not use them
        return FP32(), f"fp32 — {cap.why}, but {measured}"
    return BF16Autocast(), f"bf16 autocast — {cap.why}; {measured}"


@PRECISION.register("auto")
class Auto(PrecisionPolicy):
    """bf16 autocast where the device runs bf16 matmuls faster than fp32, fp32 elsewhere.

    `resolve(device)` returns the concrete policy (the trainer calls it once and reports the
    reason); used unresolved, every method resolves for the device type it is given (the
    CPU for the device-less ones).
    """

    def __init__(self) -> None:
        self._chosen: dict[str, tuple[PrecisionPolicy, str]] = {}

    def resolve(self, device: str) -> tuple[PrecisionPolicy, str]:
        key = torch.device(device).type
        if key not in self._chosen:
            self._chosen[key] = choose(device)
        return self._chosen[key]

    @property
    def compute_dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.resolve("cpu")[0].compute_dtype

    def autocast(self, device_type: str) -> Any:
        return self.resolve(device_type)[0].autocast(device_type)

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.resolve("cpu")[0].prepare(model)

    def element_bytes(self, device_type: str) -> ElementBytes:
        """The bytes of the policy `auto` picks on `device_type`, measured here (or forced by
        `TESSERA_FAST_BF16`): DryRunError when this machine has no such device to measure (fp32
        and bf16 autocast save activations in different widths, so neither is a safe guess)."""
        here = device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available())
        if not here and os.environ.get(FORCE_ENV) not in ("0", "1"):
            raise DryRunError(f"precision=auto picks fp32 or bf16 autocast by measuring the run's device "
                              f"({device_type}), which this machine does not have; size the run with an explicit "
                              f"precision (precision=@bf16 or precision=@fp32)")
        return self.resolve(device_type)[0].element_bytes(device_type)


def resolve(precision: PrecisionPolicy, device: str) -> tuple[PrecisionPolicy, str]:
    """The concrete policy a run uses on `device` and a one-line description of it. For `auto`
    that says what was chosen and why; an explicit half precision the device runs slowly
    still runs, with one `SlowPrecisionWarning` stating the measured slowdown."""
    if isinstance(precision, Auto):
        return precision.resolve(device)
    name = PRECISION.name_of(type(precision)) or type(precision).__name__
    dtype = precision.compute_dtype
    if dtype == torch.float32:
        return precision, name
    cap = capability(dtype, device)
    if cap.native and not cap.forced:
        return precision, name
    ratio = speedup(dtype, device)
    if ratio >= 1.0:
        return precision, name
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    message = (f"precision={name}: {_ratio_text(ratio, dtype_name, _where(device))} ({cap.why}); this run will be "
               f"about that much slower than with precision=@fp32 (or @auto, which picks the fast one)")
    warnings.warn(message, SlowPrecisionWarning, stacklevel=2)
    return precision, f"{name} — {_ratio_text(ratio, dtype_name, _where(device))}"
