"""Durations read from the environment: how a deployment tunes timings without a flag."""
from __future__ import annotations

import os

from progprune.errors import BadInput


def env_seconds(name: str, default: float, allow_zero: bool = False, maximum: float | None = None) -> float:
    """$`name` as seconds (> 0, or >= 0 with `allow_zero`; at most `maximum` where given);
    `default` when unset or blank. Anything else (text, nan, inf, a negative, above the
    maximum) is refused with the variable's name."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v >= 0 if allow_zero else v > 0) or v == float("inf") or (maximum is not None and v > maximum):
        bound = f" and <= {maximum:g}" if maximum is not None else ""
        raise BadInput(f"{name}: expected a number of seconds {'>= 0' if allow_zero else '> 0'}{bound}, "
                       f"got {raw!r}")
    return v
