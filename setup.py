"""Maps the checkout's top-level folders under the one import name `tessera`.

`registry/`, `components/`, `cli/` and `recipes/` stay where a reader looks for them; installed (wheel or
editable) they import as `tessera.registry`, `tessera.components`, `tessera.cli`, `tessera.recipes`; the
wheel holds no other top-level name. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

TOP_LEVEL = ("registry", "components", "cli", "recipes")

setup(
    packages=[f"tessera.{name}" for name in find_packages(include=[f"{top}*" for top in TOP_LEVEL])],
    package_dir={f"tessera.{top}": top for top in TOP_LEVEL},
)
