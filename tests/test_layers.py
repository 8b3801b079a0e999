"""The layers point one way: every `tessera` module imports only its own layer and those below.

Read from the source (every `import` statement, function-level ones included), so a lazy import
that reaches upward counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"registry": "tessera.registry", "components": "tessera.components", "cli": "tessera.cli",
           "recipes": "tessera.recipes"}

# Lowest first. A module belongs to the first layer whose prefix it starts with (longest prefix wins).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("bottom: the registry and the interfaces", ("tessera.registry", "tessera.components.interfaces")),
    # What blocks use to describe themselves: weight init helpers, the tensor-parallel layout
    # vocabulary a block's `tensor_parallel_plan` is written in, process-group helpers.
    ("primitives", ("tessera.components.model.init", "tessera.components.parallel.tp_styles",
                    "tessera.components.parallel.loss_parallel", "tessera.components.parallel.process_group",
                    "tessera.components.parallel.slurm_env")),
    ("blocks", tuple(f"tessera.components.{p}" for p in (
        "attention", "position", "norm", "mlp", "moe", "model", "optim", "schedule", "precision", "data"))),
    ("families, parallel plans, the trainer, sampling and evaluation", tuple(f"tessera.components.{p}" for p in (
        "families", "parallel", "train", "generate", "evaluate", "ablation", "builtin"))),
    ("top: the command line and the recipes", ("tessera.cli", "tessera.recipes")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    rest = parts[1:-1] if parts[-1] == "__init__" else parts[1:]
    return ".".join([FOLDERS[parts[0]], *rest])


def layer_of(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), rank)
    if best[1] < 0:
        if module in ("tessera", "tessera.components"):
            return 0  # namespace / package roots hold no code
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS")
    return best[1]


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree)  # annotations only: never imported at run time
                 if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("tessera.")}


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for module, path in sorted(all_modules().items()):
        for imported in sorted(imports_of(path)):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]})")
    assert not upward, "\n".join(upward)


def test_the_registry_imports_no_component_but_the_interfaces():
    offending = [f"{m} imports {i}" for m, p in all_modules().items() if m.startswith("tessera.registry")
                 for i in imports_of(p) if i.startswith("tessera.components") and i != "tessera.components.interfaces"]
    assert not offending, offending


def test_there_is_no_import_cycle_between_modules():
    modules = all_modules()
    graph = {m: {i for i in imports_of(p) if i in modules} for m, p in modules.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("imported", ["tessera.registry", "tessera.components.interfaces"])
def test_importing_the_bottom_layer_loads_no_component(imported: str):
    code = (f"import sys, {imported}\n"
            "print(sorted(m for m in sys.modules if m.startswith('tessera.components') "
            "and m != 'tessera.components.interfaces' and m != 'tessera.components'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(sys.prefix)).stdout.strip()
    assert out == "[]", out


def test_no_function_is_longer_than_a_screen():
    """A function a reader can hold at once: at most 60 lines, decorators and docstring included."""
    long = []
    for module, path in sorted(all_modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > 60:
                    long.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines ({path}:{start})")
    assert not long, "\n".join(long)
