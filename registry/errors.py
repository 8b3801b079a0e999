"""Errors raised by the config machinery. Their messages name the config path and the fix."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable


class RegistryError(LookupError):
    """A registry was asked for something it cannot give (unknown name, wrong kind, ...).

    `problem` says what is wrong, `fix` what to do; str() joins them in one paragraph.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One problem found in a config tree: where it is, what is wrong, how to fix it."""

    path: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.problem}. Fix: {self.fix}"


class ConfigError(ValueError):
    """Every fault found in one config, reported together."""

    def __init__(self, faults: Iterable[Fault]):
        self.faults = list(faults)
        lines = [f"  - {f}" for f in self.faults]
        noun = "fault" if len(self.faults) == 1 else "faults"
        super().__init__(f"config has {len(self.faults)} {noun}:\n" + "\n".join(lines))


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
