"""Decoder-only language model: embedding (+ absolute positions) -> blocks -> final norm -> head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from tessera.components.interfaces import (
    AbsoluteEncoding,
    AttentionCache,
    AuxiliaryLoss,
    CachedAttention,
    Norm,
    PositionEncoding,
    position_kind,
)
from tessera.components.model import softmax_cross_entropy
from tessera.components.model.block import TransformerBlock
from tessera.components.model.mtp import MultiTokenPrediction
from tessera.registry.invariants import invariant


@invariant("every layer's attention.dim == dim",
           lambda dim, layers: all(layer.attention.dim == dim for layer in layers),
           fix="give every layer the model's dim (e.g. model.layers[*].attention.dim=<dim>)")
@invariant("norm.dim == dim", lambda dim, norm: norm.dim == dim, fix="set model.norm.dim to the model's dim")
@invariant("position is absolute (or NoPE/None)",
           lambda position: position_kind(position) in (None, "absolute", "none"),
           fix="put rotary and additive encodings on each attention (model.layers[*].attention.position); "
               "the model takes only absolute ones such as @learned or @sinusoidal")
@invariant("a learned position table has the model's dim",
           lambda position, dim: getattr(position, "dim", dim) == dim, fix="set model.position.dim to the model's dim")
@invariant("0 <= embedding_dropout < 1", lambda embedding_dropout: 0 <= embedding_dropout < 1,
           fix="use a probability in [0, 1)")
class DecoderLM(nn.Module):
    """A causal language model over a list of blocks (layers may differ: dense then MoE,
    linear attention here and softmax there).

    Args:
        vocab_size: V, size of the token embedding and the output head.
        dim: model width D.
        layers: the blocks, applied in order.
        norm: final `Norm` before the head.
        position: an absolute encoding added to the embeddings (GPT-2's learned table),
            or None when the attentions carry position themselves (RoPE, ALiBi).
        tie_embeddings: share the embedding matrix with the output head.
        embedding_dropout: dropout on the (position-added) embeddings.
        init_std: std of the normal init of embeddings and input projections
            (DeepSeek uses 0.006, GPT-2 0.02).
        depth_scaled_init: output projections of each block use init_std / sqrt(2 * n_layers)
            so the residual stream's variance does not grow with depth (GPT-2).
        mtp: multi-token prediction modules, one per extra depth (DeepSeek-V3: one); they share
            the embedding and the head. Used by `losses`, not by `forward`.
        mtp_loss_weight: lambda of the MTP loss (V3: 0.3, later 0.1).

    forward(tokens: [B, T] int64, *, doc_ids: [B, T] | None) -> logits [B, T, V].
    Decoding (`tessera.components.generate`): `new_caches` / `new_mtp_caches` make one cache per
    layer, `hidden_cached` runs new tokens over them.
    """

    def __init__(self, *, vocab_size: int, dim: int, layers: list[TransformerBlock], norm: Norm,
                 position: PositionEncoding | None = None, tie_embeddings: bool = False,
                 embedding_dropout: float = 0.0, init_std: float = 0.02, depth_scaled_init: bool = True,
                 mtp: list[MultiTokenPrediction] | None = None, mtp_loss_weight: float = 0.3):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.init_std = init_std
        self.depth_scaled_init = depth_scaled_init
        self.embedding = nn.Embedding(vocab_size, dim)
        self.position = position
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.head.weight = self.embedding.weight
        self.mtp = nn.ModuleList(mtp or [])
        self.mtp_loss_weight = mtp_loss_weight

    @property
    def tied(self) -> bool:
        """Whether the head reads the embedding's very weight (False on a part holding only one)."""
        return self.head is not None and self.embedding is not None and self.head.weight is self.embedding.weight

    def _share_part_of(self, model: DecoderLM, *, layers: Sequence[int], first: bool, last: bool) -> None:
        """Make this module a part of `model` (a pipeline stage) holding `model`'s own
        submodules, not copies, under `model`'s names: the embedding, its position table and
        dropout when `first`; the main layers `layers` (an `nn.ModuleDict` keyed by their index
        in `model`, so they keep their names `layers.<i>`); the final norm, head and MTP modules
        when `last`. What it does not hold is None (MTP: an empty dict), and `hidden_states`
        and `losses` skip it. A subclass's constructor calls this after `nn.Module.__init__`
        in place of `DecoderLM.__init__` (which would build new modules and draw their weights)."""
        self.vocab_size, self.dim, self.init_std = model.vocab_size, model.dim, model.init_std
        self.depth_scaled_init, self.mtp_loss_weight = model.depth_scaled_init, model.mtp_loss_weight
        self.tie_embeddings = model.tie_embeddings and first and last
        # registered in DecoderLM.__init__'s order: parameter and auxiliary-loss order follow it
        self.embedding = model.embedding if first else None
        self.position = model.position if first else None
        self.embedding_dropout = model.embedding_dropout if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.mtp = nn.ModuleDict({str(k): module for k, module in enumerate(model.mtp)} if last else {})

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> DecoderLM:
        """As `nn.Module.to_empty`, keeping a tied head tied: leaving the meta device gives every
        module's parameter its own new storage, which would silently untie the head."""
        super().to_empty(device=device, recurse=recurse)
        if self.tie_embeddings and not self.tied:
            self.head.weight = self.embedding.weight
        return self

    def blocks(self) -> list[nn.Module]:
        """Every transformer block in depth order: the main layers, then each multi-token
        prediction module's block. The units that parallel plans shard, activation
        checkpointing recomputes and `compile=True` compiles."""
        return [*_members(self.layers), *(module.block for module in _members(self.mtp))]

    def hidden_states(self, inputs: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                      embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states [B, T, D] after the layers this model holds: final-normed (what the
        head reads) where it holds the norm, else its last layer's output (a pipeline stage's
        residual stream).

        inputs: tokens [B, T] int64 where the model holds the embedding; else the residual
            stream [B, T, D] the layers before it left (a pipeline stage after the first).
        doc_ids: [B, T] document ids (attention stays within a document), or None.
        embeddings: the raw token embeddings [B, T, D] of the tokens when already looked up
            (a pipeline's first stage looks them up once for the layers and the MTP modules);
            None: looked up here.
        """
        x = inputs if self.embedding is None else self._embedded(inputs, embeddings)
        for layer in _members(self.layers):
            x = layer(x, doc_ids=doc_ids)
        return x if self.norm is None else self.norm(x)

    def _embedded(self, tokens: torch.Tensor, embeddings: torch.Tensor | None) -> torch.Tensor:
        """The residual stream's start [B, T, D]: token embeddings (plus absolute positions),
        after the embedding dropout."""
        x = self.embedding(tokens) if embeddings is None else embeddings
        if isinstance(self.position, AbsoluteEncoding):
            x = x + self.position(torch.arange(tokens.shape[1], device=tokens.device), self.dim).to(x.dtype)
        return self.embedding_dropout(x)

    def forward(self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden_states(tokens, doc_ids=doc_ids))

    # -- cached decoding ---------------------------------------------------------------------------
    def new_caches(self, *, batch: int, max_len: int, device: torch.device | str,
                   dtype: torch.dtype) -> list[AttentionCache]:
        """One empty cache per main layer for `batch` rows of up to `max_len` tokens. Raises
        TypeError naming the first layer whose attention cannot decode with a cache."""
        return [_cached_attention(layer.attention, f"layers.{i}").new_cache(
            batch=batch, max_len=max_len, device=device, dtype=dtype) for i, layer in enumerate(_members(self.layers))]

    def new_mtp_caches(self, *, batch: int, max_len: int, device: torch.device | str,
                       dtype: torch.dtype) -> list[AttentionCache]:
        """One empty cache per multi-token prediction module's block (their attention runs over
        positions too)."""
        return [_cached_attention(module.block.attention, f"mtp.{k}.block").new_cache(
            batch=batch, max_len=max_len, device=device, dtype=dtype) for k, module in enumerate(_members(self.mtp))]

    def hidden_cached(self, tokens: torch.Tensor, *, caches: Sequence[AttentionCache],
                      positions: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, D] of new tokens [B, T] at `positions` [B, T] (-1:
        left padding), each layer reading and extending its cache from `new_caches`."""
        x = self.embedding(tokens)
        if isinstance(self.position, AbsoluteEncoding):  # padding (-1) takes position 0; nothing reads it
            x = x + self.position(positions.clamp(min=0), self.dim).to(x.dtype)
        x = self.embedding_dropout(x)
        for layer, cache in zip(_members(self.layers), caches, strict=True):
            x = layer.forward_cached(x, cache=cache, positions=positions)
        return self.norm(x)

    def losses(self, inputs: torch.Tensor, targets: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
               embeddings: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss terms; their sum is what is minimised.

        - "lm": next-token cross-entropy (mean over tokens, fp32 logits);
        - "mtp" (with MTP modules): mtp_loss_weight / D * sum over depths k of the
          cross-entropy of predicting targets[:, k:] (token i+k+1) at positions i < T-k;
        - "balance" (with MoE layers): the sum of their weighted balance losses.

        inputs: tokens [B, T] int64 (or, on a part without the embedding, the residual stream
        [B, T, D]: see `hidden_states`, as for `embeddings`); targets: [B, T] (the tokens
        shifted by one); doc_ids: [B, T]. A part of a model (`_share_part_of`) gives the terms
        of what it holds: "lm" and "mtp" where it holds the head, "balance" of its own layers.
        """
        hidden = self.hidden_states(inputs, doc_ids=doc_ids, embeddings=embeddings)
        terms: dict[str, torch.Tensor] = {}
        if self.head is not None:
            terms["lm"] = cross_entropy(self.head(hidden), targets)
            if len(self.mtp):
                terms["mtp"] = self._mtp_loss(hidden, inputs, targets, doc_ids=doc_ids, embeddings=embeddings)
        balance = self.balance_loss()
        if balance is not None:
            terms["balance"] = balance
        return terms

    def _mtp_loss(self, hidden: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, *,
                  doc_ids: torch.Tensor | None, embeddings: torch.Tensor | None) -> torch.Tensor:
        """mtp_loss_weight x the mean over depths k of the cross-entropy of targets[:, k:]:
        depth k reads depth k-1's hidden states [B, T-k+1, D] (the main model's, normed, for
        k = 1) at positions < T-k and the embeddings of the tokens k steps ahead, which are
        `embeddings[:, k:]` when given, else looked up from `tokens`."""
        if embeddings is None and self.embedding is None:
            raise ValueError("the MTP modules read the token embeddings, which this part of the model does not "
                             "hold: pass embeddings= (the first stage's lookup)")
        depth_losses = []
        for k, module in enumerate(_members(self.mtp), start=1):
            t = targets.shape[1] - k
            ahead = self.embedding(tokens[:, k:]) if embeddings is None else embeddings[:, k:]
            hidden = module(hidden[:, :t], ahead, doc_ids[:, :t] if doc_ids is not None else None)
            depth_losses.append(cross_entropy(self.head(module.head_norm(hidden)), targets[:, k:]))
        return self.mtp_loss_weight * torch.stack(depth_losses).mean()

    def balance_loss(self) -> torch.Tensor | None:
        """The sum of this model's auxiliary losses (the MoE balance terms) from the forward
        just run, a scalar; None when no module has one."""
        aux = [m.auxiliary_loss() for m in self.modules() if isinstance(m, AuxiliaryLoss)]
        aux = [a for a in aux if a is not None]
        return torch.stack(aux).sum() if aux else None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter in place (after materialising from the meta device).

        Every block is already initialised by its constructor (std 1/sqrt(fan_in)); this pass
        redraws all of them with the model's stds through their `reset_parameters`."""
        out_std = self.init_std / math.sqrt(2 * len(self.layers)) if self.depth_scaled_init else self.init_std
        nn.init.normal_(self.embedding.weight, std=self.init_std)
        if isinstance(self.position, AbsoluteEncoding):
            self.position.reset_parameters(init_std=self.init_std)
        for layer in self.layers:
            layer.reset_parameters(init_std=self.init_std, out_std=out_std)
        self.norm.reset_parameters()
        if not self.tied:
            nn.init.normal_(self.head.weight, std=self.init_std)
        for module in self.mtp:
            module.reset_parameters(init_std=self.init_std, out_std=out_std)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] (computed in fp32) against targets [B, T]."""
    if isinstance(logits, DTensor):  # vocab-sharded by tensor parallelism: loss from the shards, never gathered
        from tessera.components.parallel.loss_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits, targets)
    if softmax_cross_entropy.wanted(logits):  # torch's CPU log_softmax backward is slow
        return softmax_cross_entropy.softmax_cross_entropy(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _cached_attention(attention: nn.Module, where: str) -> CachedAttention:
    """`attention` if it can decode with a cache, else a TypeError naming it and the way out."""
    if not isinstance(attention, CachedAttention):
        kind = type(attention)
        raise TypeError(f"{where}.attention ({kind.__module__}.{kind.__qualname__}) cannot decode with a cache: it "
                        f"does not implement tessera.components.interfaces.CachedAttention (new_cache, "
                        f"forward_cached); generate with use_cache=False, or implement that interface")
    return attention


def _members(modules: nn.ModuleList | nn.ModuleDict) -> list[nn.Module]:
    """The modules of a list, or of a dict keyed by their index in the whole model (the
    layers a pipeline stage holds), in order."""
    return list(modules.values()) if isinstance(modules, nn.ModuleDict) else list(modules)
