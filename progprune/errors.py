"""The project's error types, and how an exception reads on one line.

One hierarchy, two meanings the CLI keeps apart:
  ProgpruneError          the root; catch it to catch everything progprune raises
  +- BadInput             a spec, flag or file to change: exit 2, nothing was run
  |  +- SpecError         a spec with one or more problems, each named by its field path
  +- CombinationFailed    the input was fine but the run failed (a diverged training): exit 1
and, beside them, Terminated (a KeyboardInterrupt): SIGTERM unwinding as Ctrl-C does, exit 143.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import threading
from typing import NamedTuple


def closest_names(word: str, options, n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Up to `n` of `options` close to `word`, best first: difflib's ratio, ties to the
    longer common prefix (resnet21 -> resnet20)."""
    options = list(options)
    if not options:
        return []
    close = difflib.get_close_matches(word, options, n=len(options), cutoff=cutoff)  # all: ties first
    return sorted(close, key=lambda c: (difflib.SequenceMatcher(None, word, c).ratio(),
                                        len(os.path.commonprefix([word, c]))), reverse=True)[:n]


def did_you_mean(word: str, options) -> str:
    """"; did you mean 'x'?" when one of `options` is close to `word`, else ""."""
    close = closest_names(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def one_line(e: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """An exception's first non-empty line, at most `limit` characters ("..." marks a cut);
    the type's name when the message is empty. `with_type`: "Type: line"."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return f"{type(e).__name__}: {text}" if with_type and lines else text


class ProgpruneError(Exception):
    """Root of progprune's errors. The CLI prints one as one line and exits `exit_code`.
    `field` names the setting at fault (a spec path such as 'dataset.data_dir') when
    there is one, so callers can re-label it (the CLI names its flag instead)."""

    exit_code = 1

    def __init__(self, message: str, field: str | None = None):
        self.message, self.field = message, field
        super().__init__(f"{field}: {message}" if field else message)


class BadInput(ProgpruneError):
    """Bad user input (spec, flag, file): say what to change. Exit 2; nothing was run."""

    exit_code = 2


class CombinationFailed(ProgpruneError):
    """The input was valid but running it failed (e.g. training diverged). Exit 1; a
    sweep records it as the combination's failed row."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `ray job stop`, Kubernetes stopping a pod), raised in the main thread
    where the program is, so that it unwinds as Ctrl-C does (`finally` blocks and context
    managers remove what is half-written); the CLI prints one line and exits 143 (128 +
    SIGTERM), where Ctrl-C exits 130."""


_SIGTERM_SEEN = threading.Event()


def sigterm_seen() -> bool:
    """Whether the latest `sigterm_unwinds` block caught a SIGTERM: what a KeyboardInterrupt really was where a
    library re-raised it as a plain one (Ray's blocking calls turn any KeyboardInterrupt a
    signal handler raises into a new `KeyboardInterrupt()`)."""
    return _SIGTERM_SEEN.is_set()


@contextlib.contextmanager
def sigterm_unwinds():
    """While in this block, SIGTERM raises `Terminated` in the main thread. `install()` of
    the yielded object puts the handler back after a library replaced it (Ray's driver
    installs a crash handler for SIGTERM when it connects); a second SIGTERM during the
    clean-up is ignored. Outside the main thread signals stay as they are."""
    import signal

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _SIGTERM_SEEN.set()
        raise Terminated()

    class _Handler:
        def install(self) -> None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, raise_terminated)

    if threading.current_thread() is not threading.main_thread():
        yield _Handler()
        return
    _SIGTERM_SEEN.clear()  # what sigterm_seen reports: a SIGTERM during this block
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield _Handler()
    finally:
        signal.signal(signal.SIGTERM, previous)


class Problem(NamedTuple):
    """One problem of a spec: the field path and what to change."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(BadInput):
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
