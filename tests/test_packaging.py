"""tessera installs one import name, and a user's own top-level modules cannot shadow it.

Before the `tessera` namespace the wheel installed `registry`, `components` and `recipes` as
top-level packages: a user project with its own `registry.py` or `components/` package (common
in applications) shadowed them, and a block dropped into a third-party model failed to import.
The example scripts run in such a project in tests/test_examples.py and test_example_third_party.py.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.user_project import make_user_project, run_in

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_no_top_level_name_but_tessera(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("tessera-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tessera"}
    for package in ("registry", "components", "cli", "recipes"):
        assert f"tessera/{package}/__init__.py" in names
    assert "tessera/recipes/deepseek_pretrain.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "tessera.components.builtin:register" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    return make_user_project(tmp_path / "project")


def test_the_flagship_recipe_runs_in_a_project_with_its_own_registry(user_project: Path):
    result = run_in(user_project, ROOT / "recipes" / "deepseek_pretrain.py", "steps=2", "metrics.eval_every=0",
                    "precision=@fp32", f"data.data_dir={ROOT / 'runs' / 'data'}")  # the suite's prepared corpus
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: loss" in result.stdout, result.stdout[-2000:]


def test_the_example_plugin_registers_in_a_project_with_its_own_registry(user_project: Path):
    check = user_project / "check_plugin.py"
    check.write_text(
        "import tessera_cosine_attention  # registers on import, as its entry point would\n"
        "from tessera.registry import ATTENTION\n"
        "config = ATTENTION.config('cosine_attention', dim=32, n_heads=4)\n"
        "print(ATTENTION.origin('cosine_attention'), type(config).__name__)\n")
    result = run_in(user_project, check, extra_path=str(ROOT / "examples" / "custom_plugin"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["tessera_cosine_attention.attention", "Config"]
