"""Third-party plugins through the `tessera.components` entry-point group, with real distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_plugin_registers_lazily_and_broken_plugin_only_warns(tmp_path):
    make_distribution(tmp_path, "good-norms", "good_norms", """
        import torch
        from components.interfaces import Norm
        from registry import NORM

        @NORM.register("scale_norm")
        class ScaleNorm(Norm):
            def __init__(self, *, dim: int):
                super().__init__()
                self.dim = dim
                self.g = torch.nn.Parameter(torch.ones(()))

            def forward(self, x):
                return self.g * x / x.norm(dim=-1, keepdim=True)
    """)
    make_distribution(tmp_path, "broken-blocks", "broken_blocks", "raise RuntimeError('boom at import')\n")
    result = run_python("""
        import sys, warnings
        from registry import NORM
        assert "good_norms" not in sys.modules, "plugins must load lazily"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = NORM.names()
        assert "scale_norm" in names, names
        messages = [str(w.message) for w in caught]
        assert any("broken-blocks" in m and "boom at import" in m for m in messages), messages
        print("OK", names)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_plugin_component_is_swappable_and_loadable_from_json(tmp_path):
    make_distribution(tmp_path, "good-norms", "good_norms", """
        import torch
        from components.interfaces import Norm
        from registry import NORM

        @NORM.register("scale_norm")
        class ScaleNorm(Norm):
            def __init__(self, *, dim: int, eps: float = 1e-6):
                super().__init__()
                self.dim = dim

            def forward(self, x):
                return x
    """)
    dump = tmp_path / "cfg.json"
    recipe = str(ROOT / "recipes" / "llama_pretrain.py")
    result = run_python(f"""
        import sys
        sys.argv = [{recipe!r}, "model.norm=@scale_norm", "--dump", {str(dump)!r}]
        from recipes.llama_pretrain import recipe
        recipe.main()
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"good_norms"' in dump.read_text()
    result = run_python(f"""
        import sys
        sys.argv = [{recipe!r}, "--load", {str(dump)!r}, "--help"]
        from recipes.llama_pretrain import recipe
        from registry import serialize
        cfg = serialize.load({str(dump)!r})
        assert type(cfg.model.norm).__name__ == "Config" and cfg.model.norm.__fn_or_cls__.__name__ == "ScaleNorm"
        recipe.main()
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scale_norm" in result.stdout
