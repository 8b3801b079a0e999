"""Invariants shared by the attention variants, declared with `tessera.registry.invariant`."""

from __future__ import annotations

from typing import Any

from tessera.components.interfaces import position_kind


def _head_dim(dim: int, n_heads: int, head_dim: int | None) -> int:
    return head_dim if head_dim is not None else dim // n_heads


POSITION_SUPPORTED = dict(
    rule="position kind in cls.supported_positions",
    check=lambda cls, position: position is None or position_kind(position) in cls.supported_positions,
    fix="use a position encoding of a kind this attention supports (absolute encodings go on the model: "
        "model.position=@learned(...)); see the class's supported_positions",
)

EVEN_ROTARY_DIM = dict(
    rule="rotary head_dim is even",
    check=lambda position, dim, n_heads, head_dim: position_kind(position) != "rotary"
    or _head_dim(dim, n_heads, head_dim) % 2 == 0,
    fix="use an even head_dim (RoPE rotates channel pairs)",
)

QK_NORM_DIMS = dict(
    rule="q_norm and k_norm are both set or both None, with dim == head_dim",
    check=lambda q_norm, k_norm, dim, n_heads, head_dim: (q_norm is None) == (k_norm is None)
    and (q_norm is None or q_norm.dim == k_norm.dim == _head_dim(dim, n_heads, head_dim)),
    fix="set both q_norm and k_norm to norms of dim head_dim, or neither",
)

HEADS_DIVIDE_DIM = dict(
    rule="dim % n_heads == 0 unless head_dim is given",
    check=lambda dim, n_heads, head_dim: head_dim is not None or dim % n_heads == 0,
    fix="choose n_heads that divides dim, or set head_dim explicitly",
)

KV_HEADS_DIVIDE = dict(
    rule="n_heads % n_kv_heads == 0",
    check=lambda n_heads, n_kv_heads: n_kv_heads is None or n_heads % n_kv_heads == 0,
    fix="choose n_kv_heads that divides n_heads (n_kv_heads=n_heads is MHA, 1 is MQA)",
)

DROPOUT_RANGE = dict(
    rule="0 <= dropout < 1", check=lambda dropout: 0 <= dropout < 1, fix="use a probability in [0, 1)",
)


def _attention_settings(model: Any, name: str) -> list[int]:
    """The `name` argument of every layer's attention that has one (configs or modules)."""
    found = []
    for layer in getattr(model, "layers", []):
        value = getattr(getattr(layer, "attention", None), name, None)
        if isinstance(value, int):
            found.append(value)
    return found


WINDOW_FITS_SEQUENCE = dict(
    rule="every attention window <= seq_len",
    check=lambda model, seq_len: all(w <= seq_len for w in _attention_settings(model, "window")),
    fix="use a window no longer than the training sequence, or plain causal attention",
)

SEQUENCE_FILLS_BLOCKS = dict(
    rule="seq_len % block_size == 0 for every block-sparse attention",
    check=lambda model, seq_len: all(seq_len % b == 0 for b in _attention_settings(model, "block_size")),
    fix="make seq_len a multiple of the attention block_size",
)
