"""examples/third_party_model.py trains a plain nn.Module built from tessera's MLA and DeepSeekMoE,
with the balance loss and the aux-free bias update wired in by hand."""

from __future__ import annotations

import math
import re

from helpers.launch import ROOT
from helpers.user_project import make_user_project, run_in


def test_third_party_model_trains_with_hand_wired_balancing(tmp_path):
    # from a user's project with its own registry.py and components/: a block reused in a model of
    # one's own must not depend on those top-level names
    result = run_in(make_user_project(tmp_path / "project"), ROOT / "examples" / "third_party_model.py", timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout

    steps = re.findall(r"^step\s+(\d+)\s+lm loss (\S+)\s+balance loss (\S+)\s+bias update: max \|expert bias\| (\S+)",
                       out, flags=re.M)
    assert len(steps) >= 3, out
    gamma = float(re.search(r"aux-free expert bias with gamma (\S+)", out)[1])
    for step, lm, balance, bias in steps:
        assert math.isfinite(float(lm)), out
        assert 0 < float(balance) < 1, out  # the weighted balance term was added (and is finite)
        # each optimizer step moves a bias by at most gamma, and the first one moves some bias by exactly gamma
        assert 0 < float(bias) <= (int(step) + 1) * gamma + 1e-9, out

    first, last = map(float, re.search(r"^train: lm loss (\S+) -> (\S+)", out, flags=re.M).groups())
    assert abs(first - math.log(256)) < 0.3, out  # starts near uniform over bytes
    assert last < first - 1.0, out
    val_first, val_last = map(float, re.search(r"^val: lm loss (\S+) -> (\S+)", out, flags=re.M).groups())
    assert val_last < val_first - 1.0, out

    rows = re.findall(r"^expert bias, block \d+: (.+)$", out, flags=re.M)
    biases = [[float(b) for b in row.split()] for row in rows]
    assert len(biases) == 2 and all(len(row) == 8 for row in biases), out
    for row in biases:
        assert any(b != 0 for b in row), out  # the bias update ran
        # b_i is a sum of +-gamma (or 0) steps (DeepSeek-V3, arXiv:2412.19437 section 2.1.2)
        assert all(abs(b / gamma - round(b / gamma)) < 1e-6 for b in row), (row, gamma)
