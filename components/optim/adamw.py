"""AdamW (Loshchilov & Hutter, 2019), torch's own implementation."""

from __future__ import annotations

import torch

from registry.kinds import OPTIMIZER

# torch.optim.AdamW is registered as-is: recipes configure it with
# OPTIMIZER.partial("adamw", lr=..., betas=..., weight_decay=...) and the trainer calls the
# built partial with the model's parameter groups.
OPTIMIZER.register("adamw")(torch.optim.AdamW)
