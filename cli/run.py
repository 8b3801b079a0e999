"""The command line shared by every recipe:

    python recipes/X.py [PRESET] [path=value ...] [--print | --dump FILE | --dry-run] [--load FILE]
                        [--resume [auto | CHECKPOINT]] [--export-hf DIR] [--from-hf CHECKPOINT]
    python recipes/X.py sample | perplexity | evaluate ...     (see `tessera.cli.use`)

Flow: preset (or --load FILE) -> overrides and swaps -> validation -> one action
(print the tree, dump JSON, dry-run plan, or build and run). Config faults exit with
status 2 and a message naming each path and its fix, never a traceback; so does a parallel
plan the model or the launch cannot take (found when the plan is applied, before any
process group or training; under torchrun every process says why). A run that
diverges and cannot recover (see `tessera.components.train.guard`) exits with status 3 and a
message naming the step, what went non-finite and what to try.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.markup import escape

from tessera.cli.slurm import add_arguments as add_slurm_arguments
from tessera.registry import serialize
from tessera.registry.errors import ConfigError, Fault, RegistryError
from tessera.registry.overrides import apply_overrides
from tessera.registry.printing import config_tree
from tessera.registry.registry import all_registries
from tessera.registry.validate import validate

if TYPE_CHECKING:
    from tessera.cli.recipe import Recipe


def _parser(recipe: Recipe) -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {name:<20} {recipe.summary(name)}{'  (default)' if name == recipe.default else ''}"
        for name in recipe.presets
    )
    registries = "\n".join(f"  {reg.kind:<14} {', '.join(reg.names())}" for reg in all_registries())
    parser = argparse.ArgumentParser(
        prog=f"python recipes/{recipe.name}.py",
        description=(recipe.doc or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"presets:\n{presets}\n\nregistered components (swap with path=@name(arg=value); "
            f"arguments and docs: python -m tessera.registry list [KIND]):\n{registries}\n\n"
            "overrides:\n"
            "  steps=200  optimizer.lr=1e-3  precision=@fp16(loss_scale=None)\n"
            "  model.layers[*].attention.n_kv_heads=2      ([*] broadcasts over a list)\n"
            "  model.layers[*].attention=@gqa(n_kv_heads=2) (swap by registry name)\n\n"
            f"use a trained model (help: python recipes/{recipe.name}.py sample -h):\n"
            "  sample --prompt TEXT    perplexity FILE    evaluate --tasks hellaswag,arc_easy"
        ),
    )
    parser.add_argument("args", nargs="*", metavar="[PRESET] [path=value ...]",
                        help="preset name (optional), then overrides")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print", action="store_true", help="print the resolved config tree and exit")
    action.add_argument("--dump", metavar="FILE", help="write the resolved config as JSON and exit")
    action.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device; print parameters and FLOPs per token")
    parser.add_argument("--load", metavar="FILE", help="start from a JSON config written by --dump")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="auto|CHECKPOINT",
                        help="resume from the newest complete checkpoint in the run's checkpoint folder, "
                             "or from the CHECKPOINT folder given; `--resume auto` resumes if there is one and "
                             "else starts fresh (the one command a launcher's restarts can repeat)")
    parser.add_argument("--export-hf", metavar="DIR",
                        help="after training (or resuming a finished run), write the model to DIR as a transformers "
                             "checkpoint: LlamaForCausalLM, or DeepseekV3/V2ForCausalLM for MLA models")
    parser.add_argument("--from-hf", metavar="CHECKPOINT",
                        help="continue pretraining a transformers checkpoint folder: its config.json replaces the "
                             "preset's model, its weights the initialisation, its tokenizer.json the data's tokenizer "
                             "(applied before the overrides; see docs/guides/continued-pretraining.md)")
    add_slurm_arguments(parser)
    return parser


def resolve(recipe: Recipe, args: list[str], load: str | None = None, *, check: bool = True,
            from_hf: str | None = None) -> tuple[Any, list[str]]:
    """The config for positional `args` (preset then overrides), validated when `check`.

    Option groups the preset leaves at their defaults are spelled out first, so overrides reach
    them (`step.grad_clip=0.5`); a `--load` file written before `train` grouped its options is
    regrouped. Returns (config, notes), the notes being what swaps and old files want the user
    to know.
    """
    from tessera.cli.old_configs import load_config, moved_override_faults
    from tessera.cli.option_groups import spell_out

    overrides = list(args)
    preset = None
    notes: list[str] = []
    if overrides and "=" not in overrides[0]:
        preset = overrides.pop(0)
    if load is not None:
        if preset is not None:
            raise ConfigError([Fault(
                preset, "a preset name cannot be combined with --load", "drop the preset or --load")])
        config, notes = load_config(load)
    else:
        config = recipe.config(preset)
    spell_out(config)
    if from_hf is not None:  # before the overrides, so they can still adjust the checkpoint's run
        from tessera.cli.from_hf import apply_from_hf

        notes += apply_from_hf(config, from_hf)
    elif preset in recipe.continues_a_checkpoint:
        raise ConfigError([Fault(preset, "this preset continues a released checkpoint, and none was given",
                                 f"add --from-hf CHECKPOINT_FOLDER (python recipes/{recipe.name}.py {preset} "
                                 f"--from-hf path/to/model)")])
    moved = moved_override_faults(config, overrides)
    if moved:
        raise ConfigError(moved)
    notes += apply_overrides(config, overrides)
    if check:
        validate(config)
    return config, notes


def _set_resume(config: Any, resume: bool | str) -> None:
    """Point the run's checkpointer at what --resume asked for; a bare --resume with no
    checkpoint to resume from is an error, not a silent fresh start (`--resume auto` starts
    fresh then, and says so when the run begins)."""
    checkpoint = config.__arguments__.get("checkpoint") if hasattr(config, "__arguments__") else None
    if checkpoint is None:
        raise ConfigError([Fault("checkpoint", "--resume needs a run that writes checkpoints, and this one has none",
                                 "set `checkpoint` in the preset: fdl.Config(Checkpointer, folder=...)")])
    checkpoint.resume = resume
    if resume is True and not _has_checkpoint(Path(checkpoint.folder)):
        raise ConfigError([Fault("--resume", f"there is no complete checkpoint in {checkpoint.folder} to resume from",
                                 "run without --resume to start fresh, pass --resume auto to resume when there "
                                 "is a checkpoint and start fresh when not, or pass --resume PATH to a checkpoint "
                                 "(or checkpoint.folder=... where the run wrote them)")])


def _has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds any complete checkpoint (which one is intact is the
    checkpointer's to decide when the run starts)."""
    return folder.is_dir() and any((p / "COMPLETE").exists() for p in folder.glob("step-*"))


def _check_export(config: Any, ns: argparse.Namespace) -> None:
    """Refuse --export-hf before any training when it cannot be done: with another action, or
    for a model no transformers layout we write can express."""
    if ns.print or ns.dump or ns.dry_run:
        raise ConfigError([Fault("--export-hf", "exports the model a run trains, and this command trains none",
                                 "drop --print/--dump/--dry-run, or drop --export-hf")])
    from tessera.components.train.export import export_faults
    from tessera.components.train.launch import build_model_on_meta

    faults = export_faults(build_model_on_meta(config.model))
    if faults:
        raise ConfigError(faults)


def run_cli(recipe: Recipe, argv: list[str] | None = None) -> None:
    """Parse `argv` (default: sys.argv), resolve and validate the config, then do the one action
    asked; `sample`, `perplexity` and `evaluate` use a trained model instead (`tessera.cli.use`)."""
    from tessera.cli.use import COMMANDS, use_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return use_cli(recipe, argv)
    ns = _parser(recipe).parse_intermixed_args(argv)  # overrides may follow flags
    if isinstance(ns.resume, str) and "=" in ns.resume and not Path(ns.resume).exists():
        ns.args.append(ns.resume)  # `--resume steps=400`: an override, not a checkpoint path
        ns.resume = True
    err, out = Console(stderr=True), Console()
    try:
        config = _checked_config(recipe, ns, err=err, out=out)
    except (ConfigError, RegistryError) as error:
        _fail(err, error, status=2)
    if ns.print:
        return
    if ns.dump:
        serialize.dump(config, ns.dump)
        out.print(f"wrote {ns.dump}", markup=False)
    elif ns.dry_run:
        _dry_run(config, err=err, out=out)
    elif ns.slurm is not None:
        _submit_slurm(recipe, config, ns, err=err, out=out)
    else:
        _train(config, export_hf=ns.export_hf, err=err)



def _submit_slurm(recipe: Recipe, config: Any, ns: argparse.Namespace, *, err: Console, out: Console) -> None:
    """--slurm: write the job's sbatch script and submit it (see `tessera.cli.slurm`)."""
    from tessera.cli.slurm import submit

    script = sys.argv[0] if Path(sys.argv[0]).stem == recipe.name else f"recipes/{recipe.name}.py"
    try:
        out.print(submit(config=config, spec=ns.slurm, script_only=ns.slurm_script_only, name=recipe.name,
                         script=script, args=ns.args, load=ns.load, from_hf=ns.from_hf, export_hf=ns.export_hf),
                  markup=False, highlight=False, soft_wrap=True)
    except ConfigError as error:
        _fail(err, error, status=2)


def _fail(err: Console, error: BaseException, *, status: int, label: str = "[bold red]error:[/bold red]") -> NoReturn:
    """Print `error` as one message (no traceback) and exit with `status`."""
    err.print(f"{label} {escape(str(error))}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(status)


def _checked_config(recipe: Recipe, ns: argparse.Namespace, *, err: Console, out: Console) -> Any:
    """The resolved config with --resume applied, printed first under --print (so a faulty
    tree can be inspected), then validated."""
    config, notes = resolve(recipe, ns.args, ns.load, check=False, from_hf=ns.from_hf)
    for note in notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if ns.resume is not None:
        _set_resume(config, ns.resume)
    if ns.print:
        out.print(config_tree(config, label=f"{recipe.name}"))
    validate(config)
    if ns.export_hf is not None:
        _check_export(config, ns)
    return config


def _dry_run(config: Any, *, err: Console, out: Console) -> None:
    from tessera.components.interfaces import DryRunError
    from tessera.components.parallel.mesh import MeshError
    from tessera.components.train.dry_run import dry_run

    try:
        dry_run(config, console=out)
    except (MeshError, DryRunError) as error:  # the plan the model cannot take, found on the meta device; a
        # plan, precision policy or component that cannot say what the run would hold
        _fail(err, error, status=2)


def _train(config: Any, *, export_hf: str | None, err: Console) -> None:
    """Build and run; each way a run can end early is one message and its exit status."""
    from tessera.components.data.preparation import PreparationQueued
    from tessera.components.data.sources.rows import MalformedRowError
    from tessera.components.parallel.mesh import MeshError
    from tessera.components.parallel.process_group import RendezvousError
    from tessera.components.parallel.rank_state import RankStateError
    from tessera.components.parallel.slurm_env import SlurmEnvError, adopt_slurm_rendezvous
    from tessera.components.parallel.tensor_parallel import TensorParallelError
    from tessera.components.train.checkpoint_faults import CheckpointSaveError
    from tessera.components.train.guard import TrainingDiverged
    from tessera.components.train.launch import launch
    from tessera.components.train.preemption import RunInterrupted
    from tessera.components.train.resume_config import ResumeError

    try:
        adopt_slurm_rendezvous()  # srun with no torchrun: RANK, WORLD_SIZE... from SLURM_*
        launch(config, export_hf=export_hf)
    except TrainingDiverged as error:
        _fail(err, error, status=3)
    except RendezvousError as error:  # the process group cannot be reached: where, and what to check
        _fail(err, error, status=1, label="[bold red]rendezvous error:[/bold red]")
    except (ResumeError, RankStateError, MeshError, TensorParallelError, SlurmEnvError) as error:  # a checkpoint
        # that cannot be resumed (by this many processes, for per-process hook state),
        # SLURM variables naming no rendezvous, a plan the model or the launch cannot take (a plugin block
        # whose own tensor-parallel plan leaves a weight unsplit): the config paths and the fix. Every process
        # prints: torchrun stops the others as soon as one exits, so a message left to rank 0 alone could be lost.
        _fail(err, error, status=2)
    except RunInterrupted as stopped:  # SIGTERM / Ctrl-C: the step finished and was saved
        _fail(err, stopped, status=128 + stopped.signum, label="[bold yellow]stopped:[/bold yellow]")
    except (MalformedRowError, FileNotFoundError, PreparationQueued) as error:  # the corpus: say what, no traceback
        _fail(err, error, status=4, label="[bold red]data error:[/bold red]")
    except CheckpointSaveError as error:  # a full disk or an unwritable folder, with on_save_error=stop
        _fail(err, error, status=5, label="[bold red]checkpoint error:[/bold red]")
    except MemoryError as error:  # out of memory, re-raised with what to change (out_of_memory.py), or
        # step.micro_batch_size=auto finding not even one sequence within the budget
        _fail(err, error, status=6, label="[bold red]out of memory:[/bold red]")
