"""What every process imports when the registry loads the built-in components: nothing from the
optional extras (a plain `pip install` must run every recipe) and none of the heavy libraries
that only one component needs (each costs every process ~1-2 s at start-up)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import sys
import tessera.components.builtin as builtin
builtin.register()
from tessera.registry import OPTIMIZER
assert "sophia_h" in OPTIMIZER.names(), OPTIMIZER.names()
print(sorted(name for name in ("lm_eval", "pytorch_optimizer", "transformers", "datasets") if name in sys.modules))
"""


@pytest.mark.slow
def test_the_registry_loads_without_the_eval_extra_and_without_heavy_libraries(tmp_path):
    blocked = tmp_path / "lm_eval"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('lm_eval is not installed (blocked by the test)')\n")
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
