"""Third-party plugins as real installed distributions, and Python run with them installed, for the
plugin and catalogue tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers.launch import ROOT, environment


def make_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """Write an installed distribution (package + .dist-info with an entry point) into `site`."""
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[tessera.components]\n{dist} = {module}\n")
    (info / "RECORD").write_text("")


def run_python(code: str, site: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` (dedented) in a fresh interpreter with the distributions in `site` installed,
    in the checkout's root but without it on the path (-P): the package imports as installed."""
    env = environment({"PYTHONPATH": os.pathsep.join([str(site), environment()["PYTHONPATH"]])})
    return subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
