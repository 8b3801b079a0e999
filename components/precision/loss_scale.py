"""Dynamic loss scaling for fp16 autocast (torch.amp.GradScaler), configured from recipes."""

from __future__ import annotations

import torch

from tessera.registry.invariants import invariant


@invariant("backoff_factor < 1 < growth_factor",
           lambda backoff_factor, growth_factor: backoff_factor < 1 < growth_factor,
           fix="grow the scale by a factor > 1 and back off by one < 1")
class LossScale:
    """Start at `init_scale`; on an inf/nan gradient skip the step and multiply the scale by
    `backoff_factor`; after `growth_interval` clean steps multiply it by `growth_factor`.
    Skipped steps are recorded in the run's history as "skipped_overflow"."""

    def __init__(self, *, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.init_scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    def scaler(self, device: str) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(torch.device(device).type, init_scale=self.init_scale,
                                    growth_factor=self.growth_factor, backoff_factor=self.backoff_factor,
                                    growth_interval=self.growth_interval)
