"""Checkpoint weights into a laid-out model, each process reading only its own shard.

A family's `sources(hf_config)` says where each of our parameters lives in the checkpoint
(`Source`: a tensor name, optionally a block of rows of a fused tensor, optionally stored
transposed). `load_hf_weights` walks the parameters this process holds (plain tensors, or
DTensor shards under FSDP / tensor parallel, or a pipeline stage's share), works out which
region of the whole tensor its local piece is, and reads just that region from the
safetensors files with `safe_open(...).get_slice`, so no process holds a full copy of a
sharded weight.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# Buffers some checkpoints store that no model parameter needs (recomputed on load).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# GPT-2's original release names its tensors without the `transformer.` prefix transformers writes.
DROPPED_PREFIXES = ("transformer.",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
    """Where one of our tensors is in a checkpoint.

    `name`: the checkpoint tensor. `offset`: our row r is its row offset + r (one of `parts`
    blocks of a fused tensor, e.g. GPT-2's query/key/value). `transposed`: the checkpoint stores
    the matrix as [in, out] (GPT-2's Conv1D), ours is [out, in]; rows then count its columns.
    `stacked`: instead of `name`, our dim 0 indexes these tensors (DeepSeek's per-expert weights
    in our [experts, ...] bank)."""

    name: str = ""
    offset: int = 0
    transposed: bool = False
    parts: int = 1
    stacked: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.stacked or (self.name,)

    def read(self, lazy: Callable[[str], Any], region: tuple[slice, ...]) -> torch.Tensor:
        """Our tensor's `region` (one slice per dimension, in our layout); `lazy(name)` is the
        checkpoint tensor's lazy slice, which reads only what is indexed."""
        if self.stacked:
            return torch.stack([lazy(name)[region[1:]] for name in self.stacked[region[0]]])
        tensor_slice = lazy(self.name)
        rows = slice(self.offset + region[0].start, self.offset + region[0].stop)
        if len(region) == 1:
            return tensor_slice[rows]
        if self.transposed:
            return tensor_slice[region[1], rows].T
        return tensor_slice[(rows, *region[1:])]

    def stored_shape(self, lazy: Callable[[str], Any]) -> list[int]:
        """The shape of the whole tensor the checkpoint holds for us, in our layout."""
        shape = list(lazy(self.names[0]).get_shape())
        if self.stacked:
            return [len(self.stacked), *shape]
        if self.transposed and len(shape) == 2:
            shape = shape[::-1]
        return [shape[0] // self.parts, *shape[1:]] if shape[0] % self.parts == 0 else shape


def weight_files(folder: str | Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a checkpoint folder (one file, or
    several listed in model.safetensors.index.json); FileNotFoundError when there are none."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            files.update({name: file for name in handle.keys()})
    for name, file in list(files.items()):  # the short names of an older release under today's names too
        files.update({prefix + name: file for prefix in DROPPED_PREFIXES if prefix + name not in files})
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (a transformers checkpoint folder has "
                                f"model.safetensors or model-0000x-of-0000y.safetensors); .bin checkpoints are "
                                f"not read: re-save them with save_pretrained(..., safe_serialization=True)")
    return files


def local_region(param: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor]:
    """(the region of the whole tensor this process holds, the local tensor to write it into)."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True)), param.to_local()
    return tuple(slice(0, s) for s in param.shape), param


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, folder: str | Path, sources: Mapping[str, Source], *,
                    ignored: tuple[str, ...] = ()) -> int:
    """Copy every parameter of `model` this process holds, and every buffer `sources` names,
    from the checkpoint in `folder` (`sources`: the family's map; `ignored`: name prefixes of
    checkpoint tensors no model tensor needs); returns the number of values read. KeyError
    when a parameter has no checkpoint tensor or the checkpoint has tensors the model has no
    place for; ValueError for a shape that differs (each listing the names)."""
    files = weight_files(folder)
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in sources)]
    _check_names([name for name, _ in tensors], files, sources, ignored)
    read = 0
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}

        def lazy(name: str) -> Any:
            return _lazy(handles[files[name]], name)

        for name, tensor in tensors:
            source = sources[name]
            if source.stored_shape(lazy) != list(tensor.shape):
                raise ValueError(f"checkpoint tensor {source.names[0]} of shape {lazy(source.names[0]).get_shape()} "
                                 f"cannot hold our {name} of shape {list(tensor.shape)}: config.json and the "
                                 f"weights differ")
            region, local = local_region(tensor)
            if local.numel():
                local.copy_(source.read(lazy, region).to(local.dtype))
                read += local.numel()
    return read


def _lazy(handle: Any, name: str) -> Any:
    """The lazy slice of tensor `name`, stored under it or under a short name (`DROPPED_PREFIXES`)."""
    if name in handle.keys():
        return handle.get_slice(name)
    return handle.get_slice(next(name.removeprefix(p) for p in DROPPED_PREFIXES if name.startswith(p)))


def _check_names(ours: list[str], files: Mapping[str, Path], sources: Mapping[str, Source],
                 ignored: tuple[str, ...]) -> None:
    unmapped = [name for name in ours if name not in sources]
    missing = sorted({n for name in ours if name in sources for n in sources[name].names if n not in files})
    used = {n for source in sources.values() for n in source.names}
    aliases = {name for n in used for p in DROPPED_PREFIXES for name in (p + n, n.removeprefix(p))}
    unexpected = sorted(n for n in files if n not in used | aliases and not n.endswith(IGNORED_SUFFIXES)
                        and not _bare(n).startswith(ignored))
    if unmapped or missing or unexpected:
        raise KeyError(f"the checkpoint does not match the model: parameters with no checkpoint tensor "
                       f"{unmapped[:6]}, tensors missing from the checkpoint {missing[:6]}, checkpoint tensors "
                       f"the model has no place for {unexpected[:6]} (is the model built from this config.json?)")


def _bare(name: str) -> str:
    """`name` without a prefix older releases' files carry (`weight_files` lists both spellings)."""
    return next((name.removeprefix(p) for p in DROPPED_PREFIXES if name.startswith(p)), name)
