"""The example scripts run, and the example plugin works once pip-installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_recipe


@pytest.mark.parametrize("script", ["reuse_block.py", "swap_component.py"])
def test_example_runs(script):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr


def test_example_plugin_installed_with_pip(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "examples" / "plugin")],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    result = run_recipe("model.norm=@scale_norm", "--dry-run",
                        env={"PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])})
    assert result.returncode == 0, result.stderr
    assert "swapped to NORM 'scale_norm'" in result.stderr
