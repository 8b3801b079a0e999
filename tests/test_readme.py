"""The code in the README and the documentation runs as printed.

Every fenced block of README.md and docs/**/*.md is checked by its language:

- `python`: executed as it stands, each block in a fresh namespace (all in one subprocess). A
  block preceded by `<!-- doctest: fragment (why) -->` is only compiled and its imports run; one
  preceded by `<!-- doctest: script (why) -->` is a whole script, run by its own test below.
- `bash`: must parse (`bash -n`); every command in it is checked by `_check_command` (all in one
  subprocess): a recipe's preset and overrides are resolved and validated as the recipe would,
  `--dry-run` runs the dry run, `torchrun` checks the plan against its process count, `python -m`
  modules must import, scripts must exist and know the flags given, `pip install` targets and
  extras must exist. A command the checker does not know fails: teach it here.
- `toml`: must parse. `text` (or no language): output, not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

# Not conftest's ROOT: the command checker runs this module in a subprocess of its own.
ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "bash", "toml", "text", ""}
MODES = {"run", "fragment", "script"}
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
DIRECTIVE = re.compile(r"<!--\s*doctest:\s*(?P<mode>\w+)\b.*?-->\s*$")
QUICK_START = [
    "pip install torch==2.13.0 && pip install -e . && python recipes/deepseek_pretrain.py",
    'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q',
]


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    mode: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_blocks(lang: str | None = None) -> list[Block]:
    """The fenced blocks of every documentation file, in reading order (of `lang` only if given)."""
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for match in FENCE.finditer(text):
            previous = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            directive = DIRECTIVE.search(previous)
            found.append(Block(path=path, line=text.count("\n", 0, match.start()) + 1, lang=match["lang"],
                               code=match["code"], mode=directive["mode"] if directive else "run"))
    return [b for b in found if lang is None or b.lang == lang]


def commands(block: Block) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped, `&&` chains split."""
    import shlex

    found = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            found.append(shlex.join(words[:cut]))
            words = words[cut + 1:]
    return found


def _run_json(code: str, items: list[dict[str, str]], timeout: float) -> list[dict[str, str]]:
    """Run `code` in a fresh interpreter with `items` as JSON on stdin; it writes one result per
    item, as JSON, to the file named by argv[1]."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-doctest-{os.getpid()}-{abs(hash(code))}.json"
    result = subprocess.run([sys.executable, "-c", code, str(out)], input=json.dumps(items), text=True,
                            capture_output=True, cwd=ROOT, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and out.exists(), result.stderr[-3000:]
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink()


# -- the documentation's shape -----------------------------------------------------------------


def test_blocks_use_known_languages_and_directives():
    blocks = doc_blocks()
    assert len(blocks) > 20, "the fence pattern found too few blocks: is it still right?"
    for path in DOC_FILES:
        indented = [n + 1 for n, line in enumerate(path.read_text().splitlines()) if re.match(r"\s+```", line)]
        assert not indented, f"{path.relative_to(ROOT)}:{indented}: an indented fence is not checked; unindent it"
    for block in blocks:
        assert block.lang in LANGUAGES, f"{block.where}: no checker for ```{block.lang} blocks; add one here"
        assert block.mode in MODES, f"{block.where}: unknown doctest mode {block.mode!r}; use one of {sorted(MODES)}"
        assert block.mode == "run" or block.lang == "python", f"{block.where}: a doctest mode on a non-python block"


def test_readme_is_short_and_its_quick_start_is_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "README.md is over its 300-line limit: move detail into docs/"
    shown = [c for b in doc_blocks("bash") if b.path.name == "README.md" for c in [b.code.strip()]]
    for command in QUICK_START:
        assert command in shown, f"the README's quick start no longer shows `{command}` as its own block"
    ci = (ROOT / ".ci" / "run").read_text()
    pins = set(re.findall(r"torch==([\w.+]+)", ci))
    assert pins == {"2.13.0"}, f".ci/run installs torch {pins}, the quick start pins 2.13.0"
    assert "python -m pytest -q" in ci and "mkdocs build --strict" in ci


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_included_results_exist():
    for path in DOC_FILES:
        for target in re.findall(r'^--8<-- "([^":]+)', path.read_text(), re.M):
            assert (ROOT / target).is_file(), f"{path.relative_to(ROOT)} includes {target}, which does not exist"


def test_toml_blocks_parse():
    for block in doc_blocks("toml"):
        tomllib.loads(block.code)


def test_bash_blocks_parse():
    for block in doc_blocks("bash"):
        result = subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True)
        assert result.returncode == 0, f"{block.where}: {result.stderr}"


# -- python blocks -----------------------------------------------------------------------------

_RUN_PYTHON = r'''
import ast, json, sys, traceback

results = []
for item in json.loads(sys.stdin.read()):
    try:
        tree = ast.parse(item["code"], item["where"])
        if item["mode"] != "run":  # a fragment or a script: its imports must still resolve
            tree.body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(tree, item["where"], "exec"), {"__name__": "__doc_block__"})
        results.append({"where": item["where"], "error": ""})
    except BaseException:
        results.append({"where": item["where"], "error": traceback.format_exc(limit=-3)})
open(sys.argv[1], "w").write(json.dumps(results))
'''


def test_python_blocks_run():
    blocks = doc_blocks("python")
    results = _run_json(_RUN_PYTHON, [{"where": b.where, "code": b.code, "mode": b.mode} for b in blocks], 300)
    failed = [f"{r['where']}:\n{r['error']}" for r in results if r["error"]]
    assert not failed, "\n".join(failed)
    assert len(results) == len(blocks)


def test_the_ten_line_recipe_trains_from_its_command_line(tmp_path):
    (block,) = [b for b in doc_blocks("python") if b.mode == "script" and "recipe.main()" in b.code]
    script = tmp_path / "my_run.py"
    script.write_text(block.code)
    result = subprocess.run(
        [sys.executable, str(script), "steps=3", "batch_size=2", "seq_len=32", "scheduler.warmup_steps=1",
         "model.layers[*].attention=@sliding_window(window=16)"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.search(r"done: loss ([\d.]+) -> ([\d.]+) \(val ([\d.]+)\) in 3 steps", result.stdout)
    assert done, result.stdout[-2000:]
    assert all(float(x) < 8.5 for x in done.groups())  # finite, near ln(2048) = 7.62 after 3 steps


# -- bash blocks: every command ------------------------------------------------------------------


@pytest.mark.parametrize("part", ["README.md", "docs"])  # two processes: each well under a minute
def test_bash_commands_are_accepted(part):
    items = [{"where": b.where, "command": c} for b in doc_blocks("bash") for c in commands(b)
             if b.where.startswith(part)]
    assert len(items) > 10
    results = _run_json("import sys; from tests.test_readme import _check_commands_main; _check_commands_main()",
                        items, 240)
    failed = [f"{r['where']}: `{r['command']}`\n{r['error']}" for r in results if r["error"]]
    assert not failed, "\n".join(failed)
    assert len(results) == len(items)


def _check_commands_main() -> None:
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
        raise AssertionError(f"no check for `{program}` commands: add one to tests/test_readme.py")


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
        raise AssertionError(f"no check for `python -m {module}`: add one to tests/test_readme.py")


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

