"""The built-in offline corpus: three domains from the Python standard library on every machine.

- "code": the stdlib's `.py` source files;
- "prose": the docstrings of those files (module, class and function), English prose;
- "docs": the `pydoc_data` help topics (the language reference text).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tessera.components.data.document import Document, decode
from tessera.components.interfaces import DataSource
from tessera.registry.kinds import DATA_SOURCE


def stdlib_files(root: str | None, max_bytes: int) -> Iterator[tuple[Path, bytes]]:
    """(path, bytes) of the `.py` files under `root` (default: this interpreter's stdlib), sorted
    by path, stopping before the file that would take the total over `max_bytes`."""
    folder = Path(root or sysconfig.get_paths()["stdlib"])
    if not folder.is_dir():
        raise FileNotFoundError(f"stdlib folder {folder} does not exist; set root=<a folder of .py files>")
    total = 0
    for path in _python_files(folder) if root else _stdlib_listing(folder):
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            return
        total += len(data)
        yield path, data


def _python_files(folder: Path) -> list[Path]:
    """The `.py` files under `folder`, sorted, site-packages left out."""
    return sorted(p for p in folder.rglob("*.py") if "site-packages" not in p.parts)


@functools.cache
def _stdlib_listing(folder: Path) -> tuple[Path, ...]:
    """`_python_files` of this interpreter's stdlib, listed once per process: walking the tree
    takes most of a small corpus's preparation, and the stdlib does not change under a running
    interpreter (a `root` folder, which may, is listed every time)."""
    return tuple(_python_files(folder))


@DATA_SOURCE.register("stdlib_code")
@dataclasses.dataclass(kw_only=True)
class StdlibCode(DataSource):
    """Standard-library source files (sorted by path) up to `max_bytes`; domain "code"."""

    max_bytes: int = 4_000_000
    root: str | None = None
    domain: str = "code"

    def documents(self) -> Iterator[Document]:
        for path, data in stdlib_files(self.root, self.max_bytes):
            text, replaced = decode(data)
            yield Document(text=text, domain=self.domain, source=str(path), invalid_utf8=replaced)


@DATA_SOURCE.register("stdlib_docstrings")
@dataclasses.dataclass(kw_only=True)
class StdlibDocstrings(DataSource):
    """Docstrings of standard-library modules, classes and functions (one document each,
    at least `min_chars` long), read from up to `max_bytes` of source; domain "prose"."""

    max_bytes: int = 8_000_000
    min_chars: int = 200
    root: str | None = None
    domain: str = "prose"

    def documents(self) -> Iterator[Document]:
        for path, data in stdlib_files(self.root, self.max_bytes):
            try:
                tree = ast.parse(data)
            except (SyntaxError, ValueError):
                continue  # a few stdlib test files are deliberately invalid
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= self.min_chars:
                        yield Document(text=doc, domain=self.domain, source=f"{path}:{getattr(node, 'lineno', 0)}")


@DATA_SOURCE.register("pydoc_topics")
@dataclasses.dataclass(kw_only=True)
class PydocTopics(DataSource):
    """The `pydoc_data.topics` help texts (Python's language reference); domain "docs"."""

    domain: str = "docs"

    def documents(self) -> Iterator[Document]:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield Document(text=topics[name], domain=self.domain, source=f"pydoc:{name}")
