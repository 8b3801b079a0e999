"""Splits a model's parameters into optimizer groups by role."""

from __future__ import annotations

from typing import Any

from torch import nn


def decay_groups(model: nn.Module, *, decay_embeddings: bool = False, decay_vectors: bool = False
                 ) -> list[dict[str, Any]]:
    """Torch parameter groups tagged by `kind`:

    - "matrix": weight matrices of the hidden layers (and stacked expert weights): the
      optimizer's configured weight decay; Muon orthogonalises the 2-D ones;
    - "embedding": the token/position embeddings and the output head: no weight decay unless
      `decay_embeddings`;
    - "vector": norm weights and biases: no weight decay unless `decay_vectors`.
    Empty groups are left out. A tied embedding/head appears once.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        embedding_ids.add(id(head.weight))
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embedding": [], "vector": []}
    for param in model.parameters():
        if param.requires_grad:
            kind = "embedding" if id(param) in embedding_ids else "matrix" if param.dim() >= 2 else "vector"
            groups[kind].append(param)
    no_decay = {"weight_decay": 0.0}
    out = [{"params": groups["matrix"], "kind": "matrix"},
           {"params": groups["embedding"], "kind": "embedding", **({} if decay_embeddings else no_decay)},
           {"params": groups["vector"], "kind": "vector", **({} if decay_vectors else no_decay)}]
    return [g for g in out if g["params"]]
