"""The suite's own launches (tests/helpers/launch.py) leave nothing behind in the machine's
temporary folder: torchrun's log folders go to one folder per test session (tests/conftest.py)."""

from __future__ import annotations

from helpers.launch import torchrun


def test_a_torchrun_launch_leaves_no_log_folder_in_the_temporary_folder(tmp_path):
    program = tmp_path / "hello.py"
    program.write_text("import os\nprint('hello from', os.environ['RANK'])\n")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = torchrun(program, env={"TMPDIR": str(temporary)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split("\n"))[-2:] == ["hello from 0", "hello from 1"]
    assert list(temporary.iterdir()) == []  # torchrun's default: a torchelastic_* folder here, never removed
