"""The project's error types. The CLI maps each to one clean line and an exit code."""
from __future__ import annotations

import difflib
import os
from typing import NamedTuple


def closest_names(word: str, options, n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Up to `n` of `options` close to `word`, best first: difflib's ratio, ties to the
    longer common prefix (resnet21 -> resnet20)."""
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=cutoff)
    return sorted(close, key=lambda c: (difflib.SequenceMatcher(None, word, c).ratio(),
                                        len(os.path.commonprefix([word, c]))), reverse=True)


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


def show(value) -> str:
    """A value as an error message quotes it: its repr, cut to 60 characters."""
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."
