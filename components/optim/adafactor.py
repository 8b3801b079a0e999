"""Adafactor (Shazeer & Stern, 2018): factored second moments, torch's own implementation."""

from __future__ import annotations

import torch

from tessera.registry.kinds import OPTIMIZER

OPTIMIZER.register("adafactor")(torch.optim.Adafactor)
