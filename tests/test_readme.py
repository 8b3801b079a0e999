"""The code in the README and the documentation runs as printed.

Every fenced block of README.md and docs/**/*.md is checked by its language:

- `python`: executed as it stands, each block in a fresh namespace (all in one subprocess). A
  block preceded by `<!-- doctest: fragment (why) -->` is only compiled and its imports run; one
  preceded by `<!-- doctest: script (why) -->` is a whole script, run by its own test below.
- `bash`: must parse (`bash -n`); every command in it is checked by `helpers.doc_commands` (all in one
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

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "bash", "toml", "text", ""}
MODES = {"run", "fragment", "script"}
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
DIRECTIVE = re.compile(r"<!--\s*doctest:\s*(?P<mode>\w+)\b.*?-->\s*$")
QUICK_START = [
    "pip install torch==2.13.0 && pip install -e . && python recipes/deepseek_pretrain.py",
    'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q -n 2 --dist loadfile',
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


def _run_json(module: str, items: list[dict[str, str]], timeout: float) -> list[dict[str, str]]:
    """Run `python -m module OUT` (a module of tests/helpers) in a fresh interpreter with `items`
    as JSON on stdin; it writes one result per item, as JSON, to the file OUT."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-doctest-{os.getpid()}-{module}.json"
    result = subprocess.run([sys.executable, "-m", module, str(out)], input=json.dumps(items), text=True,
                            capture_output=True, cwd=ROOT, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(TESTS)})
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
    assert "python -m pytest -q -n 2 --dist loadfile" in ci and "mkdocs build --strict" in ci


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

def test_python_blocks_run():
    blocks = doc_blocks("python")
    items = [{"where": b.where, "code": b.code, "mode": b.mode} for b in blocks]
    results = _run_json("helpers.workers.doc_python", items, 300)
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
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.search(r"done: loss ([\d.]+) -> ([\d.]+) \(val ([\d.]+)\) in 3 steps", result.stdout)
    assert done, result.stdout[-2000:]
    assert all(float(x) < 8.5 for x in done.groups())  # finite, near ln(2048) = 7.62 after 3 steps


# -- bash blocks: every command ------------------------------------------------------------------


def test_bash_commands_are_accepted():
    # README's and the docs' commands in one process: the recipes and their imports load once
    items = [{"where": b.where, "command": c} for b in doc_blocks("bash") for c in commands(b)]
    for part in ("README.md", "docs"):
        assert sum(item["where"].startswith(part) for item in items) > 10, part
    results = _run_json("helpers.doc_commands", items, 480)
    failed = [f"{r['where']}: `{r['command']}`\n{r['error']}" for r in results if r["error"]]
    assert not failed, "\n".join(failed)
    assert len(results) == len(items)
