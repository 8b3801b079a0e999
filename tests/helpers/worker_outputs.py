"""Reading what multi-process workers write (tests/helpers/workers/mesh.py): each rank's whole tensors."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def merged_weights(path, processes: int) -> dict[str, torch.Tensor]:
    """The whole model's weights from each process's file `path.<rank>`; a tensor that several
    processes hold (replicas, or a sharded one gathered) must be the same on all of them."""
    merged: dict[str, torch.Tensor] = {}
    for rank in range(processes):
        for name, value in load_file(f"{path}.{rank}").items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0, msg=f"rank {rank} disagrees: {name}")
            merged[name] = value
    return merged
