"""Autocast's state for a tensor's device, safe on devices autocast does not know (meta).

`torch.autocast("meta", ...)` and `torch.is_autocast_enabled("meta")` raise, so a block that
switches autocast off for part of its forward, or casts to autocast's dtype itself, would fail
on meta tensors (a shape pass, FLOP counting). These helpers treat such a device as one where
autocast is off.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type` now; None where it is off or where the
    device has no autocast."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on `device_type` (nothing to switch off where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
