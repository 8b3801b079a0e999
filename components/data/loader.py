"""The stateful training loader: fixed-length sequences drawn from a domain mixture.

Each sequence comes from one domain, chosen by a seeded sampler with the mixture weights;
within a domain the loader reads its token array sequentially (documents separated by EOS,
wrapping around at the end, counting epochs). Its whole position (sampler RNG state,
per-domain cursors and epochs, sequences drawn) is `state_dict()`, so a resumed run sees
exactly the batches an uninterrupted one would. Data-parallel ranks draw the same stream
and each keeps every world_size-th sequence, so ranks never see the same sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tessera.components.data.store import TokenStore


def doc_ids_from_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """[B, T] document ids: 0 at the start, +1 after every EOS (the EOS closes its document)."""
    return torch.cumsum(torch.nn.functional.pad(tokens[:, :-1] == eos, (1, 0)), dim=1)


class PackedLoader:
    """Batches of `batch_size` sequences of `seq_len` tokens (plus the next-token targets).

    next_batch() -> {"tokens": [B, T] int64, "targets": [B, T] int64, "doc_ids": [B, T] int64};
    doc_ids increase after each EOS, for the attention's document mask.
    """

    def __init__(self, *, store: TokenStore, split: str, seq_len: int, batch_size: int, weights: dict[str, float],
                 seed: int, rank: int = 0, world_size: int = 1):
        self.store = store
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.domains = [d for d in sorted(weights) if weights[d] > 0]
        self.rank, self.world_size = rank, world_size
        self._arrays = {d: store.tokens(d, split) for d in self.domains}
        for domain, array in self._arrays.items():
            if array.size < seq_len + 1:
                raise ValueError(f"domain {domain!r} ({split}) has {array.size} tokens, fewer than one sequence of "
                                 f"seq_len + 1 = {seq_len + 1}; lower seq_len or give the domain more data")
        self._probs = torch.tensor([weights[d] for d in self.domains], dtype=torch.float64)
        self._generator = torch.Generator().manual_seed(seed)
        self.cursors = {d: 0 for d in self.domains}
        self.epochs = {d: 0 for d in self.domains}
        self.sequences = 0
        self._round_start = 0  # rounds of world_size sequences are counted from here

    def _take(self, domain: str) -> np.ndarray:
        array, start = self._arrays[domain], self.cursors[domain]
        end = start + self.seq_len + 1
        if end > array.size:  # wrap: finish the epoch and continue from the start
            window = np.concatenate((array[start:], array[: end - array.size]))
            self.cursors[domain] = end - array.size - 1
            self.epochs[domain] += 1
        else:
            window = np.asarray(array[start:end])
            self.cursors[domain] = end - 1  # the last token is the next window's first input
        return window.astype(np.int64)

    def next_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next `batch_size` (default: the constructor's) sequences of this rank's share."""
        batch_size = batch_size or self.batch_size
        windows = []
        # Every rank consumes whole rounds of world_size sequences, so all ranks stop at the same
        # stream position: the saved state is the same on every rank and for any world size
        # (a position saved by a different world size starts the rounds where it stands).
        while len(windows) < batch_size or (self.sequences - self._round_start) % self.world_size:
            domain = self.domains[int(torch.multinomial(self._probs, 1, generator=self._generator))]
            window = self._take(domain)
            if self.sequences % self.world_size == self.rank:
                windows.append(window)
            self.sequences += 1
        data = torch.from_numpy(np.stack(windows))
        tokens, targets = data[:, :-1], data[:, 1:]
        return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids_from_eos(tokens, self.store.eos)}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._generator.get_state(), "cursors": dict(self.cursors), "epochs": dict(self.epochs),
                "sequences": self.sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["rng"])
        self.cursors, self.epochs = dict(state["cursors"]), dict(state["epochs"])
        self.sequences = self._round_start = state["sequences"]
