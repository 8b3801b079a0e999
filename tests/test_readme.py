"""The README's code runs as printed: the ten-line recipe trains from its own command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def python_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_ten_line_recipe_trains_from_its_command_line(tmp_path):
    script = tmp_path / "my_run.py"
    script.write_text(python_block_after("## A recipe in ten lines"))
    result = subprocess.run(
        [sys.executable, str(script), "steps=3", "batch_size=2", "seq_len=32", "scheduler.warmup_steps=1",
         "model.layers[*].attention=@sliding_window(window=16)"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.search(r"done: loss ([\d.]+) -> ([\d.]+) \(val ([\d.]+)\) in 3 steps", result.stdout)
    assert done, result.stdout[-2000:]
    assert all(float(x) < 8.5 for x in done.groups())  # finite, near ln(2048) = 7.62 after 3 steps
