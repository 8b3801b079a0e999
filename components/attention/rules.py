"""Invariants shared by the attention variants, declared with `registry.invariant`."""

from __future__ import annotations

from typing import Any

from components.interfaces import position_kind


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
