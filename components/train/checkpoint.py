"""Atomic, resumable checkpoints on torch.distributed.checkpoint, stored as safetensors + JSON.

A checkpoint is a folder `step-00000042/` holding
- the tensors (model, flattened optimizer state, RNG and data-loader generator states, MoE
  router biases as model buffers) written by DCP's safetensors storage writer, so a
  sharded run writes one shard per rank and loading can reshard;
- `state.json`: every non-tensor value (step, token count, optimizer hyperparameters,
  loader cursors, loss scale, guard counters, loss history);
- `config.json`: the run's config (fiddle JSON, as `--dump` writes it), when launched
  through `launch`;
- `MANIFEST.json`: every other file's size and CRC-32 (see `tessera.components.train.manifest`),
  covering all ranks' shards;
- `COMPLETE`, written last.

It is written into `.step-...tmp/` and renamed into place only when complete, so a crash
mid-write never touches the previous checkpoint. Choosing what to resume from checks the
newest checkpoint's files against its manifest and falls back to the newest intact one,
saying which file is damaged and how; a checkpoint named explicitly must be intact. Before
any tensor is read, the run's config is compared with the checkpoint's `config.json` (see
`tessera.components.train.resume_config` for what blocks a resume and what is only noted).
Loading reads safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from tessera.components.data.tokenizer import save_encoding
from tessera.components.interfaces import HasTokenizer
from tessera.components.parallel.process_group import world
from tessera.components.train import checkpoint_faults, manifest, resume_config
from tessera.components.train.checkpoint_faults import CheckpointSaveError, SaveErrorPolicy
from tessera.components.train.resume_config import CheckpointLoadError, ResumeError, ResumeMismatch
from tessera.registry.invariants import invariant

__all__ = ["Checkpointer", "CheckpointLoadError", "CheckpointSaveError", "ResumeError", "ResumeMismatch", "load_model"]

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

AUTO = "auto"
"""`Checkpointer.resume` for a run restarted unattended: the newest intact checkpoint if any,
else a fresh start (the same choice as True), saying which."""


def split_tensors(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Pull every tensor out of a nested dict/list tree: ({dotted path: tensor}, tree with
    {"__tensor__": path} placeholders), so the rest can be stored as JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        return value

    return tensors, walk(tree, prefix)


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


def _checkpoint_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str], Any, Any]:
    """The tensors a checkpoint writes ("model.", "optim.", "extra." names, tied ones once),
    their aliases, and the optimizer's and `extra`'s non-tensor rest (for state.json)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    optim_tensors, optim_rest = split_tensors(optim_sd)
    extra_tensors, extra_rest = split_tensors(extra)
    tensors = {**{f"model.{k}": v for k, v in model_sd.items()},
               **{f"optim.{k}": v for k, v in optim_tensors.items()},
               **{f"extra.{k}": v for k, v in extra_tensors.items()}}
    tensors, aliases = without_aliases(tensors)
    return tensors, aliases, optim_rest, extra_rest


def without_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`tensors` with each one that is another's very storage (a tied head: the embedding's
    weight under two names) left out, and {left-out name: the name kept}. safetensors refuses
    shared storage, and the tie is restored on loading by reading the kept one for both."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride()) \
            if local.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = tensor
    return kept, aliases


@invariant("every >= 1 and keep >= 1", lambda every, keep: every >= 1 and keep >= 1,
           fix="checkpoint at least every step and keep at least one")
class Checkpointer:
    """Saves every `every` steps (and at the end) into `folder`, keeping the newest `keep`.

    `resume`: False starts fresh; True or "auto" resumes from the newest complete checkpoint in
    `folder` if there is one, else starts fresh ("auto" says which, for the logs of a run that
    a launcher restarts unattended: `--resume auto`); any other string is the path of the
    checkpoint to resume from. `async_save`: write in a
    background thread from a snapshot, so training continues meanwhile (the snapshot costs
    one copy of the saved tensors in memory); `wait()` blocks until done.

    `on_save_error`: when a checkpoint cannot be written (a full disk, a folder this process
    may not write), "continue" prints what happened and tries again at the next interval;
    "stop" raises `CheckpointSaveError` with the same message. Either way the previous
    checkpoint is untouched. Before each save, a warning is printed when the folder's free
    space is below the checkpoint's expected size.
    """

    def __init__(self, *, folder: str, every: int = 100, keep: int = 3, resume: bool | str = False,
                 async_save: bool = False, on_save_error: SaveErrorPolicy = "continue"):
        if on_save_error not in ("continue", "stop"):
            raise ValueError(f"checkpoint.on_save_error must be 'continue' or 'stop', got {on_save_error!r}")
        self.on_save_error = on_save_error
        self.folder = Path(folder)
        self.every = every
        self.keep = keep
        self.resume = resume
        self.async_save = async_save
        self._pending: Any = None
        self._group: Any = None
        self.run_config: str | None = None
        """The run's config as fiddle JSON (set by `launch`), saved as `config.json` in each
        checkpoint: `--load CHECKPOINT/config.json` rebuilds the run that wrote it."""
        self.last: Path | None = None
        """The checkpoint this run last wrote or loaded: the only one a rollback may return to."""
        self.tokenizer: HasTokenizer | None = None
        """The run's data (set by `launch`): its tokenizer is saved in each checkpoint as
        `tokenizer/`, so `sample` and `perplexity` read text without the corpus."""
        self._encoding: Any = None

    # -- saving ----------------------------------------------------------------------------------
    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             extra: dict[str, Any]) -> Path | None:
        """Write checkpoint `step` atomically; `extra` is any tree of tensors and JSON values.
        Returns its folder, or None when it could not be written and `on_save_error` is
        "continue" (the reason was printed); raises `CheckpointSaveError` under "stop"."""
        tensors, aliases, optim_rest, extra_rest = _checkpoint_tensors(model, optimizer, extra)
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".step-{step:08d}.tmp"
        self.wait()
        needed = checkpoint_faults.needed_bytes(tensors)
        warning = checkpoint_faults.space_warning(self.folder, needed, self.last) if _is_main() else None
        if warning:
            _say(warning)
        failure = _agree(self._attempt(lambda: _fresh_folder(tmp), step, needed) if _is_main() else None)
        # Under pipeline parallelism each rank holds only its stages' tensors: the checkpoint
        # lists every rank's (DCP writes them all), so that any layout can find them by name.
        names, optim_rest = _over_ranks(sorted(tensors), optim_rest)
        state_json = json.dumps({"step": step, "optimizer": optim_rest, "extra": extra_rest, "tensors": names,
                                 "aliases": aliases})
        encoding = self._run_encoding() if _is_main() else None

        def finish() -> None:
            if _is_main():
                _write_synced(tmp / "state.json", state_json)
                if self.run_config is not None:
                    _write_synced(tmp / "config.json", self.run_config)
                if encoding is not None:
                    save_encoding(encoding, tmp / "tokenizer")
                manifest.write(tmp)  # sizes and checksums of every rank's files, then COMPLETE
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears whole or not at all
                self._prune()

        if failure is None:
            with warnings.catch_warnings():  # a single process is the intended use here, not a mistake
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                writer = dcp.HuggingFaceStorageWriter(path=str(tmp), save_distributed=_distributed())
                if self.async_save:
                    snapshot = {k: v.detach().clone() for k, v in tensors.items()}  # training may change them next
                    # Its collectives run in a background thread: on a group of their own, so they never
                    # interleave with the training step's on the default group.
                    self._pending = (dcp.async_save(snapshot, storage_writer=writer,
                                                    process_group=self._save_group()), finish, step, needed, tmp,
                                     self.last)
                else:
                    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
                    failure = _agree(self._attempt(lambda: dcp.save(contiguous, storage_writer=writer), step, needed))
                    if failure is None:
                        _barrier()  # every rank's shard is on disk before rank 0 lists them in the manifest
                        failure = _agree(self._attempt(finish, step, needed))
        if failure is not None:
            return self._failed(failure, tmp)
        _barrier()
        self.last = final
        return final

    def _run_encoding(self) -> Any:
        """The run's tokenizer, read from its data once (a large vocabulary takes a while to parse)."""
        if self._encoding is None and self.tokenizer is not None:
            self._encoding = self.tokenizer.encoding()
        return self._encoding

    def wait(self) -> None:
        """Block until a background save has been written and renamed into place (a failed
        one is handled as in `save`, except that nothing is returned)."""
        if self._pending is not None:
            future, finish, step, needed, tmp, previous = self._pending
            self._pending = None
            self.last = previous  # until this one is in place, the one before is the newest intact
            failure = _agree(self._attempt(future.result, step, needed))
            if failure is None:
                _barrier()  # every rank's shard is written before the folder is renamed into place
                failure = _agree(self._attempt(finish, step, needed))
            if failure is not None:
                self._failed(failure, tmp)
                return
            self.last = self.folder / f"step-{step:08d}"

    def _attempt(self, action: Any, step: int, needed: int) -> str | None:
        """Run `action()`; None if it succeeded, else the message for the person running
        this when it failed writing files (any other failure propagates)."""
        try:
            action()
        except (OSError, CheckpointException) as err:
            if not isinstance(checkpoint_faults.cause_of(err), OSError):
                raise
            return checkpoint_faults.describe(err, folder=self.folder, step=step, needed=needed, intact=self.last,
                                              policy=self.on_save_error, every=self.every)
        return None

    def _failed(self, message: str, tmp: Path) -> None:
        """After a save failed on some rank (`message`, the same on every rank): drop its
        partial folder, then say so and go on, or stop (`on_save_error`)."""
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if self.on_save_error == "stop":
            raise CheckpointSaveError(message)
        if _is_main():
            _say(message)
        return None

    def _save_group(self) -> Any:
        """A process group for background saves (None in a single process)."""
        if _distributed() and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def _prune(self) -> None:
        complete = self._complete()
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def set_aside_previous(self) -> Path | None:
        """Before a fresh (not resumed) run: move checkpoints an earlier run left in `folder`
        into `folder/previous-<time>/`, so that this run's pruning and `latest()` see only
        its own, and nothing of the earlier run is lost. Returns where they went (or None)."""
        old = sorted(self.folder.glob("step-*")) + sorted(self.folder.glob(".step-*.tmp")) \
            if self.folder.exists() else []
        _barrier()  # every rank has looked (and decides alike) before rank 0 moves anything
        if not old:
            return None
        target = self.folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        if _is_main():
            target.mkdir(parents=True, exist_ok=True)
            for path in old:
                os.replace(path, target / path.name)
        _barrier()
        return target

    # -- loading ---------------------------------------------------------------------------------
    def _complete(self) -> list[Path]:
        """Checkpoint folders in `folder` with a `COMPLETE` marker, oldest first (their files
        are not checked here: see `latest`)."""
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.glob("step-*") if (p / manifest.COMPLETE).exists())

    def resume_path(self) -> Path | None:
        """The checkpoint this run should resume from, per `resume` (None: start fresh).

        `resume=True` (or "auto"): the newest checkpoint in `folder` whose files match its manifest; each
        damaged one skipped is named on stderr with the file and the damage. A path: that
        checkpoint, which must be complete and intact (`ResumeError` otherwise: a checkpoint
        asked for by name is never silently replaced by another). Then, before any tensor is
        read, the run's config is compared with the checkpoint's `config.json`:
        `ResumeMismatch` names the paths that differ when the model's tensors or the
        optimizer differ; other differences (`steps`, ...) are printed as a note.

        In a multi-process run rank 0 decides (reading the files once) and every rank gets
        its decision, so all resume from the same checkpoint or raise the same error.
        """
        if self.resume is False:
            return None
        decision: Any = None
        if _is_main():
            try:
                decision = self._decide()
            except ResumeError as err:
                decision = (type(err).__name__, str(err))
            except BaseException as err:  # tell the other ranks before failing, so none waits forever
                if _distributed():
                    _broadcast((ResumeError.__name__, f"rank 0 failed choosing a checkpoint: {err!r}"))
                raise
        decision = _broadcast(decision)
        if isinstance(decision, tuple):
            name, message = decision
            raise _RESUME_ERRORS[name](message)
        return None if decision is None else Path(decision)

    def _decide(self) -> str | None:
        """`resume_path`'s choice on one process (printing its warnings and notes)."""
        if self.resume is True or self.resume == AUTO:
            path = self.latest()
            if path is None:
                return None
        else:
            path = Path(self.resume)
            if not (path / manifest.COMPLETE).exists():
                hint = (f" ('{path}' looks like an override: --resume takes an optional path, so write overrides "
                        f"before it)" if "=" in str(self.resume) and not path.exists() else "")
                raise ResumeError(f"checkpoint {path} is missing or incomplete (no {manifest.COMPLETE} marker); "
                                  f"pass --resume without a path to take the newest intact one in {self.folder}"
                                  f"{hint}")
            damage = _damage(path)
            if damage:
                raise ResumeError(f"checkpoint {path} is damaged: {_summary(damage)}. Resume from another one "
                                  f"(--resume without a path takes the newest intact checkpoint in {self.folder}), "
                                  f"or restore the file from a copy")
        self._check_config(path)
        return str(path)

    def _check_config(self, path: Path) -> None:
        """Compare this run's config (as `launch` recorded it) with the checkpoint's own."""
        if self.run_config is None or not (path / "config.json").exists():
            return  # a run not started by `launch`, or a checkpoint written by one: nothing to compare
        from tessera.registry import serialize
        from tessera.registry.errors import ConfigError

        try:
            saved = serialize.load(path / "config.json")
            current = serialize.load_text(self.run_config, where="this run's config")
        except ConfigError as err:
            _say(f"note: cannot compare this run's config with {path / 'config.json'} ({err}); resuming anyway")
            return
        notes = resume_config.check(path, saved, current)
        if notes:
            shown = notes[:8] + ([f"... and {len(notes) - 8} more"] if len(notes) > 8 else [])
            _say(f"note: resuming {path.name} with settings that differ from its own (checkpoint's -> this run's; "
                 f"they do not change its tensors): " + "; ".join(shown))

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose files match its manifest, or None. Each
        damaged one passed over is named on stderr (file, and what is wrong with it)."""
        damaged: list[tuple[Path, list[str]]] = []
        for path in reversed(self._complete()):
            damage = _damage(path)
            if not damage:
                for bad, what in damaged:
                    _say(f"warning: checkpoint {bad.name} is damaged: {_summary(what)}; resuming from {path.name} "
                         f"instead")
                return path
            damaged.append((path, damage))
        for bad, what in damaged:
            _say(f"warning: checkpoint {bad.name} is damaged: {_summary(what)}; no intact checkpoint is left in "
                 f"{self.folder}, so nothing is resumed")
        return None

    def load(self, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place from `path`; returns the `extra` tree and step."""
        self.wait()
        try:
            state = json.loads((path / "state.json").read_text())
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
            aliases = state.get("aliases", {})
            saved = {name[len("model."):] for name in [*state["tensors"], *aliases] if name.startswith("model.")}
            elsewhere, absent = _held_elsewhere(saved, set(model_sd))
            if absent:
                raise KeyError(absent[0])
            target: dict[str, torch.Tensor] = {}
            for name in state["tensors"]:
                group, _, key = name.partition(".")
                if group == "model":
                    if key not in elsewhere:
                        target[name] = model_sd[key]
                elif group == "optim":
                    if _parameter_of(key) not in elsewhere:
                        target[name] = optim_sd[key] if key in optim_sd else None
                else:
                    target[name] = None
            shapes = _stored_shapes(path)
            for name, value in target.items():
                if value is None:
                    meta = shapes[name]
                    target[name] = torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(path=str(path)))
            _weights_from_masters(target, shapes)
            for alias, source in aliases.items():
                target[alias] = target[source]
        except KeyError as err:
            raise CheckpointLoadError(f"checkpoint {path} does not match this model/optimizer (no entry {err}); "
                                      f"resume it with the configuration that wrote it: --load "
                                      f"{path / 'config.json'} --resume") from err
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise CheckpointLoadError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); it may be "
                                      f"truncated or written by another model: resume from an older one, or with "
                                      f"the configuration that wrote it") from err
        self.last = path
        optim_tensors = {k[len("optim."):]: v for k, v in target.items() if k.startswith("optim.")}
        optim_rest = {k: v for k, v in state["optimizer"].items() if _parameter_of(k) not in elsewhere}
        set_state_dict(model, optimizer, model_state_dict={k[len("model."):]: v for k, v in target.items()
                                                           if k.startswith("model.")},
                       optim_state_dict=join_tensors(optim_rest, optim_tensors), options=_OPTIONS)
        extra_tensors = {k[len("extra."):]: v for k, v in target.items() if k.startswith("extra.")}
        return {"step": state["step"], "extra": join_tensors(state["extra"], extra_tensors)}


def load_model(path: str | Path) -> nn.Module:
    """The model checkpoint `path` holds, on the CPU: built from the `config.json` the run wrote
    into it (runs started by `launch`) and loaded with the checkpoint's model weights only."""
    import fiddle as fdl

    from tessera.registry import serialize

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"checkpoint {path} has no config.json (it is written by runs started from a recipe); "
                                f"build the model yourself and use Checkpointer.load")
    model = fdl.build(serialize.load(str(path / "config.json")).model)
    aliases = json.loads((path / "state.json").read_text()).get("aliases", {})
    target = {f"model.{k}": v for k, v in model.state_dict().items() if f"model.{k}" not in aliases}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(path=str(path)))
    target.update({alias: target[source] for alias, source in aliases.items() if alias.startswith("model.")})
    model.load_state_dict({k[len("model."):]: v for k, v in target.items()})
    return model


def _over_ranks(names: list[str], optim_rest: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """On rank 0 (which writes state.json): the union over all ranks of the tensor `names`
    each saves and of the non-tensor optimizer entries (flattened: `param_groups.<parameter>.
    <key>`, one per parameter) each holds: the same as its own unless ranks hold different
    parameters (pipeline stages). Other ranks get their own back. A collective (a gather to
    rank 0: no rank receives every other's lists) in a multi-process run."""
    if not _distributed():
        return names, optim_rest
    every: list[Any] | None = [None] * world()[1] if _is_main() else None
    torch.distributed.gather_object((names, optim_rest), every, dst=0)
    if every is None:
        return names, optim_rest
    merged: dict[str, Any] = {}
    for _, rest in every:
        merged.update(rest)
    return sorted({name for rank_names, _ in every for name in rank_names}), merged


def _held_elsewhere(saved: set[str], held: set[str]) -> tuple[set[str], list[str]]:
    """(The checkpoint's model entries (`saved`) this rank does not hold (`held`) but another
    rank does: under pipeline parallelism, the other stages' weights, which this rank skips;
    the tensors some rank holds that the checkpoint lacks, the same list on every rank, so
    that all of them refuse the checkpoint together instead of some waiting in the load's
    collectives). A saved entry no rank holds is not in the first set (the checkpoint is of
    another model). A collective in a multi-process run."""
    missing, absent = saved - held, sorted(held - saved)
    if not _distributed():
        return set(), absent
    every: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(every, (sorted(missing), absent))  # small unless the parts differ
    held_by_none = set.intersection(*(set(rank_missing) for rank_missing, _ in every))
    return missing - held_by_none, sorted({name for _, rank_absent in every for name in rank_absent})


def _parameter_of(key: str) -> str:
    """The parameter a flattened optimizer entry belongs to: `state.<parameter>.<name>` and
    `param_groups.<parameter>.<key>` -> `<parameter>` (state and hyperparameter names hold no
    dot); "" for any other key."""
    kind, _, rest = key.partition(".")
    return rest.rpartition(".")[0] if kind in ("state", "param_groups") else ""


def _weights_from_masters(target: dict[str, torch.Tensor], shapes: dict[str, dict[str, Any]]) -> None:
    """A checkpoint with fp32 master copies (bf16_params) resumed where the parameters are
    themselves fp32 (under FSDP's mixed precision, or another policy): the masters, not the
    bf16-rounded weights, become the weights. Sharded parameters take their own shard."""
    for name, live in target.items():
        if not name.startswith("model."):
            continue
        master = target.get(f"optim.state.{name[len('model.'):]}.master")
        if master is None or live.dtype != torch.float32 or shapes.get(name, {}).get("dtype") == "float32":
            continue
        with torch.no_grad():
            if isinstance(live, DTensor):
                shard = distribute_tensor(master, live.device_mesh, live.placements, src_data_rank=None)
                live.to_local().copy_(shard.to_local())
            else:
                live.copy_(master)


def _stored_shapes(path: Path) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every stored tensor, read from the safetensors headers alone (no
    tensor data is loaded). A tensor stored in shards (each rank's rows of per-process state)
    has the shape that covers them all: each shard's offset (DCP's sharding metadata) plus its shape."""
    shapes: dict[str, dict[str, Any]] = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            offsets = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for name in f.keys():
                meta = f.get_slice(name)
                start = offsets.get(name, {}).get("saved_offsets") or [0] * len(meta.get_shape())
                end = [o + n for o, n in zip(start, meta.get_shape(), strict=True)]
                known = shapes.get(name, {}).get("shape", end)
                shapes[name] = {"shape": [max(a, b) for a, b in zip(known, end, strict=True)],
                                "dtype": _DTYPES[meta.get_dtype()]}
    return shapes


# safetensors' dtype codes (as `get_dtype()` reports them) -> torch attribute names
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
           "U8": "uint8", "I8": "int8", "BOOL": "bool", "I16": "int16"}


_RESUME_ERRORS = {cls.__name__: cls for cls in (ResumeError, ResumeMismatch)}


def _damage(path: Path) -> list[str]:
    """What is wrong with checkpoint `path`'s files ([] if nothing). One written before
    manifests is checked as before (its state reads back) and noted as unverified."""
    verdict = manifest.verify(path)
    if verdict.verified or verdict.damage:
        return verdict.damage
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        return [f"{path / 'state.json'}: unreadable ({err})"]
    _say(f"note: checkpoint {path} has no {manifest.MANIFEST} (written before checkpoints recorded checksums): "
         f"resuming from it unverified")
    return []


def _summary(damage: list[str]) -> str:
    more = f" (and {len(damage) - 3} more damaged files)" if len(damage) > 3 else ""
    return "; ".join(damage[:3]) + more


def _say(message: str) -> None:
    """A warning or note for the person running this (rank 0 decides, so only it speaks)."""
    print(message, file=sys.stderr, flush=True)


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself in a single process)."""
    if not _distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _agree(message: str | None) -> str | None:
    """The first rank's failure message (None if no rank failed), the same on every rank, so
    that all of them go on, or stop, together. A collective in a multi-process run."""
    if not _distributed():
        return message
    every: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(every, message)
    return next((m for m in every if m is not None), None)


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _distributed() -> bool:
    return world()[1] > 1


def _is_main() -> bool:
    return world()[0] == 0


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()
