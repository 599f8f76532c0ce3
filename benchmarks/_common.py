"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""
from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model for the setup line, so a figure says what it was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
