"""Checks the commands of the documentation's bash blocks without running them for real.

`python -m helpers.doc_commands OUT` (tests/ on the path) reads items (where, command) as JSON
on stdin and writes each with its error ("" when accepted) as JSON to OUT. A recipe's preset
and overrides are resolved and validated as the recipe would, `--dry-run` runs the dry run,
`torchrun` checks the plan against its process count, `python -m` modules must import, scripts
must exist and know the flags given, `pip install` targets and extras must exist. A command
this module does not know fails: teach it here. Launched by tests/test_readme.py.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    """Entry point of the checking subprocess: items on stdin, results to the file argv[1]."""
    import traceback

    checked: dict[str, str] = {}
    results = []
    for item in json.loads(sys.stdin.read()):
        command = item["command"]
        if command not in checked:
            try:
                _check_command(command)
                checked[command] = ""
            except BaseException:
                checked[command] = traceback.format_exc(limit=-4)
        results.append({**item, "error": checked[command]})
    Path(sys.argv[1]).write_text(json.dumps(results))


def _check_command(command: str) -> None:
    import shlex

    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):  # VAR=value before the program
        words.pop(0)
    program, args = words[0], words[1:]
    if program == "pip":
        _check_pip(args)
    elif program == "torchrun":
        _check_torchrun(args)
    elif program == "python" and args[:1] == ["-m"]:
        _check_module(args[1], args[2:])
    elif program == "python" and args[0].startswith("recipes/"):
        _check_recipe(args[0], args[1:], world_size=None)
    elif program == "python":
        _check_script(args[0], args[1:])
    else:
        raise AssertionError(f"no check for `{program}` commands: add one to tests/helpers/doc_commands.py")


def _check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"], f"only `pip install` is checked, not pip {args[:1]}"
    ci_pin = re.search(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())[1]
    rest = args[1:]
    while rest:
        word = rest.pop(0)
        if word == "--index-url":
            assert rest.pop(0).startswith("https://")
        elif word.startswith("torch=="):
            assert word == f"torch=={ci_pin}", f"{word}: CI installs torch=={ci_pin}"
        elif word == "-e":
            _check_editable(rest.pop(0))
        else:
            raise AssertionError(f"no check for `pip install {word}`")


def _check_editable(target: str) -> None:
    """`pip install -e PATH[extras]`: PATH holds a project declaring the extras. A plugin's
    registering modules are imported, as an installed plugin's would be."""
    match = re.fullmatch(r"([^\[]+)(?:\[([\w,-]+)\])?", target)
    folder = (ROOT / match[1]).resolve()
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    for extra in filter(None, (match[2] or "").split(",")):
        assert extra in project.get("optional-dependencies", {}), f"{match[1]} has no extra {extra!r}"
    plugins = project.get("entry-points", {}).get("tessera.components", {})
    if folder != ROOT and plugins:
        import importlib

        sys.path.insert(0, str(folder))
        for module in plugins.values():
            importlib.import_module(module.split(":")[0])


def _check_torchrun(args: list[str]) -> None:
    nproc, nodes = 1, 1
    while args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--nproc-per-node", "--nproc_per_node"):
            nproc = int(args.pop(0))
        elif flag == "--nnodes":
            nodes = int(args.pop(0))
        elif flag != "--standalone":
            raise AssertionError(f"no check for torchrun's {flag}")
    _check_recipe(args[0], args[1:], world_size=nproc * nodes)


def _check_recipe(script: str, args: list[str], *, world_size: int | None) -> None:
    """Resolve and validate the preset and overrides as the recipe's command line would; run the
    dry run for --dry-run; check the parallel plan against torchrun's process count."""
    import contextlib
    import importlib
    import io

    import fiddle as fdl
    from rich.console import Console

    from tessera.cli import resolve
    from tessera.components.train.dry_run import dry_run
    from tessera.components.train.launch import build_model_on_meta

    assert (ROOT / script).is_file(), f"{script} does not exist"
    recipe = getattr(importlib.import_module(f"tessera.recipes.{Path(script).stem}"), "recipe", None)
    if recipe is None:  # a recipe file with a command line of its own (ablation.py)
        assert world_size is None, f"{script} is not a Recipe: torchrun cannot be checked for it"
        return _check_script(script, args)
    from tessera.cli.use import COMMANDS, _parser

    if args and args[0] in COMMANDS:  # sample / perplexity / evaluate: the arguments parse
        assert world_size is None, f"{args[0]} runs in one process"
        _parser(recipe).parse_args(args)
        return
    positional, flags = [], set()
    args = list(args)
    while args:
        word = args.pop(0)
        if word in ("--help", "--print", "--dry-run"):
            flags.add(word)
        elif word in ("--dump", "--export-hf"):
            assert args and not args.pop(0).startswith("-"), f"{word} needs a path"
        elif word == "--resume":
            if args and not args[0].startswith("-") and "=" not in args[0] and args[0] not in recipe.presets:
                args.pop(0)  # a checkpoint path
        elif word.startswith("-"):
            raise AssertionError(f"the recipe command line has no {word}")
        else:
            positional.append(word)
    if "--help" in flags:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            recipe.main(["--help"])
            raise AssertionError("--help did not exit")
        return
    config, _ = resolve(recipe, positional)
    if "--dry-run" in flags:
        dry_run(config, console=Console(file=io.StringIO()))
    if world_size is not None:
        plan = fdl.build(config.parallel)
        assert hasattr(plan, "check"), f"{type(plan).__name__} cannot be checked against {world_size} processes"
        plan.check(build_model_on_meta(config.model), world_size)


def _check_module(module: str, args: list[str]) -> None:
    import importlib
    import importlib.util

    if module == "tessera.registry":  # the catalogue: --write is checked as --check (and writes nothing)
        from tessera.registry.__main__ import main

        argv = ["--check" if a == "--write" else a for a in args]
        assert main(argv) == 0, f"python -m tessera.registry {' '.join(argv)} failed"
    elif module == "tessera.cli.prepare":  # the data pipeline of a recipe's preset: resolve it
        from tessera.cli import resolve

        recipe = importlib.import_module(f"tessera.recipes.{args[0]}").recipe
        resolve(recipe, [a for a in args[1:] if a != "--force"])
    elif module == "mkdocs":
        assert args[:1] in (["build"], ["serve"]), f"mkdocs {args[:1]}"
        assert (ROOT / "mkdocs.yml").is_file()
    elif module == "pytest":
        assert importlib.util.find_spec("pytest")
    else:
        raise AssertionError(f"no check for `python -m {module}`: add one to tests/helpers/doc_commands.py")


def _check_script(script: str, args: list[str]) -> None:
    """A script other than a recipe: it exists, and defines every --flag given (in its own source,
    or in a module of its folder that it names, as `train_throughput.py dense` hands over to
    `llama_throughput.py`)."""
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    source = path.read_text()
    sources = [source, *(p.read_text() for p in path.parent.glob("*.py")
                         if p != path and re.search(rf"\b{p.stem}\b", source))]
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert any(f'"{flag}"' in s for s in sources), f"{script} defines no {flag}"


if __name__ == "__main__":
    main()
