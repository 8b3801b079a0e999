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
from collections.abc import Mapping
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
    """Where one of our parameters is in a checkpoint.

    `name`: the checkpoint tensor. `offset`: our row r is its row offset + r (one of `parts`
    blocks of a fused tensor, e.g. GPT-2's query/key/value). `transposed`: the checkpoint stores the
    matrix as [in, out] (GPT-2's Conv1D), ours is [out, in]; rows then count its columns."""

    name: str
    offset: int = 0
    transposed: bool = False
    parts: int = 1
    """Equal blocks of rows the checkpoint tensor fuses (ours is one of them: 3 for GPT-2's c_attn)."""

    def read(self, tensor_slice: Any, region: tuple[slice, ...]) -> torch.Tensor:
        """Our tensor's `region` (one slice per dimension, in our layout) out of the checkpoint
        tensor's lazy `tensor_slice`."""
        rows = slice(self.offset + region[0].start, self.offset + region[0].stop)
        if len(region) == 1:
            return tensor_slice[rows]
        if self.transposed:
            return tensor_slice[region[1], rows].T
        return tensor_slice[(rows, *region[1:])]

    def whole_shape(self, stored: list[int], ours: torch.Size) -> bool:
        """Whether a stored tensor of shape `stored` holds our whole tensor of shape `ours`."""
        shape = stored[::-1] if self.transposed and len(stored) == 2 else stored
        return [shape[0], *shape[1:]] == [self.parts * ours[0], *ours[1:]]


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
def load_hf_weights(model: torch.nn.Module, folder: str | Path, sources: Mapping[str, Source]) -> int:
    """Copy every parameter of `model` this process holds from the checkpoint in `folder`
    (`sources`: the family's map); returns the number of elements read. KeyError when a
    parameter has no checkpoint tensor or the checkpoint has tensors the model has no place for;
    ValueError for a shape that differs (each listing the names)."""
    files = weight_files(folder)
    _check_names(model, files, sources)
    read = 0
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}
        for name, param in model.named_parameters():
            source = sources[name]
            tensor_slice = _lazy(handles[files[source.name]], source.name)
            if not source.whole_shape(tensor_slice.get_shape(), param.shape):
                raise ValueError(f"checkpoint tensor {source.name} of shape {tensor_slice.get_shape()} cannot "
                                 f"hold our {name} of shape {list(param.shape)}: config.json and the weights differ")
            region, local = local_region(param)
            if local.numel():
                local.copy_(source.read(tensor_slice, region).to(local.dtype))
                read += local.numel()
    return read


def _lazy(handle: Any, name: str) -> Any:
    """The lazy slice of tensor `name`, stored under it or under a short name (`DROPPED_PREFIXES`)."""
    if name in handle.keys():
        return handle.get_slice(name)
    return handle.get_slice(next(name.removeprefix(p) for p in DROPPED_PREFIXES if name.startswith(p)))


def _check_names(model: torch.nn.Module, files: Mapping[str, Path], sources: Mapping[str, Source]) -> None:
    ours = [name for name, _ in model.named_parameters()]
    unmapped = [name for name in ours if name not in sources]
    missing = sorted({sources[n].name for n in ours if n in sources and sources[n].name not in files})
    used = {source.name for source in sources.values()}
    aliases = {name for n in used for p in DROPPED_PREFIXES for name in (p + n, n.removeprefix(p))}
    unexpected = sorted(n for n in files if n not in used | aliases and not n.endswith(IGNORED_SUFFIXES))
    if unmapped or missing or unexpected:
        raise KeyError(f"the checkpoint does not match the model: parameters with no checkpoint tensor "
                       f"{unmapped[:6]}, tensors missing from the checkpoint {missing[:6]}, checkpoint tensors "
                       f"the model has no place for {unexpected[:6]} (is the model built from this config.json?)")
