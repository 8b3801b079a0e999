"""What every process imports when the registry loads the built-in components: nothing from the
optional extras (a plain `pip install` must run every recipe) and none of the heavy libraries
that only one component needs (each costs every process ~0.3-2 s at start-up); and what building
a model on the meta device imports."""

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
print(sorted(name for name in ("lm_eval", "pytorch_optimizer", "transformers", "datasets", "torch._dynamo",
                               "torch.distributed.optim", "torch.distributed.checkpoint") if name in sys.modules))
"""

META_BUILD = """
import sys
import torch
from tessera.cli import resolve
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import llama_pretrain
config, _ = resolve(llama_pretrain.recipe, ["debug"])
model = build_model_on_meta(config.model)
assert all(p.is_meta for p in model.parameters())
print("torch._dynamo" in sys.modules)
model.to_empty(device="cpu")
model.init_weights()
std = model.layers[0].attention.wq.weight.std().item()
print(0.005 < std < 0.5)
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


@pytest.mark.slow
def test_building_a_model_on_meta_skips_its_draws_and_the_compiler():
    """nn.init.normal_ on a meta tensor would import torch._dynamo (torch's Python reference of
    the draw); `build_model_on_meta` skips the draws, and the materialised model draws them."""
    done = subprocess.run([sys.executable, "-c", META_BUILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True"]


def test_the_registry_imports_every_module_that_registers():
    """`register` reads which modules register (their source calls `.register(`); every module an
    entry came from is among them, so no component goes missing."""
    import importlib
    import pkgutil

    import tessera.components
    from tessera.components import builtin
    from tessera.registry.registry import all_registries

    for module in pkgutil.walk_packages(tessera.components.__path__, prefix="tessera.components."):
        if module.name not in builtin.ADAPTERS:
            importlib.import_module(module.name)
    origins = {origin for registry in all_registries() for origin in registry._origins.values()
               if origin.startswith("tessera.components.")}
    assert origins and origins <= set(builtin.registering_modules()), origins - set(builtin.registering_modules())
