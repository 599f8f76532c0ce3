"""The project's error types. The CLI maps each to one clean line and an exit code."""
from __future__ import annotations

from typing import NamedTuple


class ProgpruneError(Exception):
    """Bad user input (spec, flag, file). The CLI prints it on one line and exits 2.
    `field` names the setting at fault (a spec path such as 'dataset.data_dir') when
    there is one, so callers can re-label it (the CLI names its flag instead)."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        self.message, self.field = message, field
        super().__init__(f"{field}: {message}" if field else message)


class Problem(NamedTuple):
    """One problem of a spec: the field path and what to change."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ProgpruneError):
    """A sweep spec with one or more problems, each a `Problem` (field path + message)."""

    def __init__(self, problems, source=None):
        if isinstance(problems, (str, Problem)):
            problems = [problems]
        self.issues = [p if isinstance(p, Problem) else Problem("", str(p)) for p in problems]
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(map(str, self.issues)))

    @property
    def problems(self) -> list[str]:
        return [str(p) for p in self.issues]
