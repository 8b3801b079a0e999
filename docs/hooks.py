"""MkDocs hooks: let mkdocstrings find the `tessera` package, and render GitHub-style table pipes.

setup.py maps the checkout's folders (registry/, components/, cli/, recipes/) under the one
import name `tessera`, so there is no `tessera/` folder for griffe's static analysis to read.
This hook builds one, of symbolic links, in a temporary folder, and gives that folder to the
python handler as its search path. The list of folders is setup.py's own `TOP_LEVEL`.

A pipe inside a table cell's code span must be written `\\|` for GitHub, where Python-Markdown
(which already ignores pipes inside code spans) would show the backslash; the site drops it.
"""

from __future__ import annotations

import ast
import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[1]


def _top_level() -> tuple[str, ...]:
    """setup.py's TOP_LEVEL: the folders installed as `tessera.<name>`."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TOP_LEVEL" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("setup.py has no TOP_LEVEL tuple: update docs/hooks.py to the new package layout")


@event_priority(100)  # before mkdocstrings' on_config, which creates the python handler
def on_config(config: Any) -> Any:
    folder = Path(tempfile.mkdtemp(prefix="tessera-docs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "tessera").mkdir()
    for name in _top_level():
        (folder / "tessera" / name).symlink_to(ROOT / name, target_is_directory=True)
    handlers = config.plugins["mkdocstrings"].config.handlers
    handlers.setdefault("python", {})["paths"] = [str(folder)]
    return config


_CODE_SPAN = re.compile(r"`[^`\n]+`")


def on_page_markdown(markdown: str, **_: Any) -> str:
    return _CODE_SPAN.sub(lambda span: span.group(0).replace("\\|", "|"), markdown)
