"""A DDP hook's per-bucket state kept meaningful when the buckets change.

A hook keeps its state (error feedback, low-rank bases) per gradient bucket, as one flat
tensor laid out like the bucket. DDP builds its buckets twice (once at wrapping, again after
the first iteration, in the order gradients became ready), and a resumed run starts over
with the first layout. So each bucket's state is tied to the parameters it covered: when a
bucket's parameters differ from those its state was made for, the state is cut into one
piece per parameter and reassembled in the bucket's new order. A checkpoint stores the
pieces by parameter name, so it does not depend on any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["BucketState"]

Sizes = Callable[[list[str]], list[tuple[str, int]]]
"""For the parameter names of one bucket (in its order): (name, elements) of each piece of a
flat state tensor, in the order the tensor holds them (names left out hold nothing)."""


class BucketState:
    """Flat per-bucket tensors (`tables[kind][bucket index]`) and the parameters each was
    made for. `kinds`: each kind of state and how its flat tensor splits into pieces."""

    def __init__(self, kinds: dict[str, Sizes]) -> None:
        self.kinds = kinds
        self.tables: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in kinds}
        self.layout: dict[int, list[str]] = {}   # bucket index -> parameter names its state is for
        self._names: dict[int, str] = {}         # id(parameter) -> name
        self.shapes: dict[str, torch.Size] = {}
        self._pieces: dict[str, dict[str, torch.Tensor]] | None = None  # loaded or mid-relayout

    def bind(self, module: nn.Module) -> None:
        """Name the parameters of the module DDP wraps (called at `register`)."""
        self._names = {id(p): name for name, p in module.named_parameters()}
        self.shapes = {name: p.shape for name, p in module.named_parameters()}

    def align(self, bucket: dist.GradBucket) -> None:
        """Before the hook runs on `bucket`: make the state of its index match its parameters."""
        index, names = bucket.index(), [self._names[id(p)] for p in bucket.parameters()]
        if self.layout.get(index) != names:
            if self._pieces is None:
                self._pieces = self.pieces()
                for table in self.tables.values():
                    table.clear()
                self.layout.clear()
            for kind, sizes in self.kinds.items():
                wanted = [name for name, _ in sizes(names)]
                if wanted and all(name in self._pieces[kind] for name in wanted):
                    self.tables[kind][index] = torch.cat([self._pieces[kind][name].reshape(-1) for name in wanted])
            self.layout[index] = names
        if bucket.is_last():  # every bucket of this iteration has its state: the pieces are spent
            self._pieces = None

    def pieces(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every kind of state cut into {parameter name: piece}."""
        if self._pieces is not None:
            return self._pieces
        out: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in self.kinds}
        for kind, sizes in self.kinds.items():
            for index, flat in self.tables[kind].items():
                pieces = sizes(self.layout[index])
                if sum(n for _, n in pieces) != flat.numel():
                    continue  # not made for this layout (cannot happen once aligned): dropped, not misplaced
                for (name, _), piece in zip(pieces, flat.split([n for _, n in pieces]), strict=True):
                    out[kind][name] = piece
        return out

    def load(self, pieces: dict[str, dict[str, Any]]) -> None:
        """Take pieces saved by `pieces()`: they become each bucket's state at its next `align`."""
        self._pieces = {kind: {name: t.clone() for name, t in pieces.get(kind, {}).items()} for kind in self.kinds}
        for table in self.tables.values():
            table.clear()
        self.layout.clear()
