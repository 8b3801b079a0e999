"""A user's own project folder, holding top-level modules named like tessera's old ones.

Before the one `tessera` import name, a project with its own `registry.py` or `components/`
package shadowed tessera's. Scripts copied into such a folder and run there (the folder first on
sys.path, as for any script) prove that nothing imports those names any more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SHADOW = "raise ImportError('the user project\\'s own {name} was imported instead of tessera\\'s')\n"


def make_user_project(folder: Path) -> Path:
    """Fill `folder` with a `registry.py`, a `recipes.py` and a `components/` package that raise
    if anything imports them; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "registry.py").write_text(SHADOW.format(name="registry.py"))
    (folder / "recipes.py").write_text(SHADOW.format(name="recipes.py"))
    (folder / "components").mkdir(exist_ok=True)
    (folder / "components" / "__init__.py").write_text(SHADOW.format(name="components package"))
    return folder


def run_in(project: Path, script: Path, *args: str, extra_path: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Copy `script` into `project` and run it there, as a user who copied it would; only
    `extra_path` (if any) is added to PYTHONPATH, so tessera imports as installed."""
    if script.parent != project:
        shutil.copy(script, project / script.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, script.name, *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout, env=env)
