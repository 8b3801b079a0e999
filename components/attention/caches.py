"""Decoding state of each attention family: what `CachedAttention.new_cache` returns.

Every cache keeps, beside its tensors, the position of the token in each slot ([B, S] int64,
-1 for an empty or padding slot), because the masks of cached attention are computed from
positions, not slot indices: rows padded on the left hold the same position at different
slots. Rows advance in lockstep, so `length` (slots written) is one int for the batch.
"""

from __future__ import annotations

import torch

from tessera.components.interfaces import AttentionCache


def _check_room(cache: AttentionCache, new: int, capacity: int) -> None:
    if cache.length + new > capacity:
        raise ValueError(f"the cache holds {capacity} token slots per row and {cache.length} are used: "
                         f"{new} more do not fit; make it with a larger max_len")


class KVCache(AttentionCache):
    """Keys and values of every past token: [B, Hkv, S, Dh] each, S = max_len (grouped-query
    and block-sparse attention). `append` writes the new tokens' keys at slots
    [length, length + T) and returns everything written so far."""

    def __init__(self, *, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.keys = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, T, Dh], positions [B, T] -> all keys, values [B, Hkv, L, Dh] and their
        positions [B, L], L = length after the write."""
        t = k.shape[2]
        _check_room(self, t, self.keys.shape[2])
        end = self.length + t
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.positions[:, self.length:end] = positions
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end], self.positions[:, :end]

    def truncate(self, length: int) -> None:
        self.positions[:, length:self.length] = -1
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class RingKVCache(AttentionCache):
    """The last `window` tokens' keys and values in a ring of `window` slots (sliding-window
    attention): memory stays [B, Hkv, window, Dh] however long the generation. Stream slot i
    lives at ring slot i % window. `extend` returns the ring's old contents followed by the new
    tokens (so a prompt longer than the window still sees its own earlier tokens), then keeps
    the newest `window` of them."""

    def __init__(self, *, batch: int, window: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.window = window
        self.keys = torch.zeros(batch, n_kv_heads, window, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, window), -1, dtype=torch.long, device=device)
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, T, Dh], positions [B, T] -> keys, values [B, Hkv, window + T, Dh] and
        positions [B, window + T] to attend over (old ring first, empty slots at position -1)."""
        k, v = k.to(self.keys.dtype), v.to(self.values.dtype)  # under autocast they arrive in the compute dtype
        keys = torch.cat((self.keys, k), dim=2)
        values = torch.cat((self.values, v), dim=2)
        key_positions = torch.cat((self.positions, positions), dim=1)
        t = k.shape[2]
        keep = min(t, self.window)
        slots = torch.arange(self.length + t - keep, self.length + t, device=k.device) % self.window
        self.keys[:, :, slots] = k[:, :, t - keep:]
        self.values[:, :, slots] = v[:, :, t - keep:]
        self.positions[:, slots] = positions[:, t - keep:]
        self.length += t
        return keys, values, key_positions

    def truncate(self, length: int) -> None:
        # The slots forgotten overwrote the oldest entries: going back one slot loses a key no
        # later query can see (it left the window); further back would need keys already gone.
        if self.length - length > 1:
            raise ValueError(f"a sliding-window cache can forget only its newest slot, not {self.length - length}")
        for i in range(length, self.length):
            self.positions[:, i % self.window] = -1
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class LatentCache(AttentionCache):
    """MLA's cache (DeepSeek-V2 §2.1.2): per token only the normalised kv latent c_KV
    (kv_lora_rank wide) and the rotated shared rope key (qk_rope_head_dim), side by side in one
    buffer `entries` [B, S, kv_lora_rank + qk_rope_head_dim]: that is the single shared key of
    the absorbed form, read in place; its first kv_lora_rank channels are the value.

    absorb: attend in the latent space with the key/value up-projections folded into the query
    and output (True), or decompress the latents into per-head keys and values every step.
    """

    def __init__(self, *, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 device: torch.device | str, dtype: torch.dtype, absorb: bool = True):
        self.rank = kv_lora_rank
        self.entries = torch.zeros(batch, max_len, kv_lora_rank + rope_dim, device=device, dtype=dtype)
        self.positions = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.absorb = absorb
        self.length = 0

    def append(self, latents: torch.Tensor, rope_keys: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, T, r], rope_keys [B, T, d_rope], positions [B, T] -> everything written
        so far: entries [B, L, r + d_rope] (latent first) and positions [B, L]."""
        t = latents.shape[1]
        _check_room(self, t, self.entries.shape[1])
        end = self.length + t
        self.entries[:, self.length:end, : self.rank] = latents
        self.entries[:, self.length:end, self.rank:] = rope_keys
        self.positions[:, self.length:end] = positions
        self.length = end
        return self.entries[:, :end], self.positions[:, :end]

    def truncate(self, length: int) -> None:
        self.positions[:, length:self.length] = -1
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return self.entries.nbytes


class LinearState(AttentionCache):
    """Linear attention's recurrent state: sum_j phi(k_j) v_j^T [B, H, Dk, Dv] and the
    normaliser sum_j phi(k_j) [B, H, Dk, 1], fp32, independent of the sequence length.

    To forget the newest tokens (a rejected draft) it keeps the state before the last update
    and that update's mapped keys and values, so it can go back within the last forward only.
    """

    def __init__(self, *, batch: int, n_heads: int, head_dim: int, device: torch.device | str):
        self.state = torch.zeros(batch, n_heads, head_dim, head_dim, device=device, dtype=torch.float32)
        self.normaliser = torch.zeros(batch, n_heads, head_dim, 1, device=device, dtype=torch.float32)
        self.length = 0
        self._before: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fold in mapped keys k [B, H, T, Dk] (zero rows for padding) and values v [B, H, T, Dv]."""
        self._before = (self.length, self.state, self.normaliser, k, v)
        self.state = self.state + k.transpose(-1, -2) @ v
        self.normaliser = self.normaliser + k.sum(-2)[..., None]
        self.length += k.shape[2]

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        if self._before is None or length < self._before[0]:
            raise ValueError("a linear-attention state can forget only tokens of its last forward")
        start, state, normaliser, k, v = self._before
        kept_k, kept_v = k[:, :, :length - start], v[:, :, :length - start]
        self.state = state + kept_k.transpose(-1, -2) @ kept_v
        self.normaliser = normaliser + kept_k.sum(-2)[..., None]
        self.length = length
        self._before = None

    def nbytes(self) -> int:
        return self.state.nbytes + self.normaliser.nbytes
