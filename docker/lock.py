#!/usr/bin/env python3
"""Write docker/constraints.txt: the image's dependency lock, resolved from pyproject.toml.

The image installs `[project] dependencies` from pyproject.toml with
`pip install -r ... -c docker/constraints.txt`, so two builds a month apart get the same
versions of everything (transitive dependencies included). Run this after changing the
dependencies in pyproject.toml or TORCH_VERSION in the Dockerfile; the test suite
(tests/test_dockerfile.py) fails until the lock matches them again:

    python docker/lock.py            # needs the package index; about 1-2 minutes

It resolves with pip itself (`pip install --dry-run --report`, no install) for the image's
platform: CPython 3.11 on manylinux x86_64 (rayproject/ray:*-py311-*), wheels only, with
torch pinned to the Dockerfile's TORCH_VERSION. torch's CUDA libraries (nvidia-*, cuda-*,
triton) are left out: they come with the torch layer, from the wheel index of CUDA_TAG, and
differ between CUDA builds. Local version labels (2.13.0+cpu) are dropped so that the pin
holds for every build of that version.

`problems()` is the check the test suite runs (no network).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "docker" / "constraints.txt"
PYPROJECT = REPO / "pyproject.toml"
DOCKERFILE = REPO / "Dockerfile"
PYTHON_VERSION = "3.11"
# pip does not widen --platform by itself: list every manylinux level a wheel may carry.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
# Installed with torch from the CUDA_TAG wheel index; their names and pins differ per build.
TORCH_OWN = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


# the extras the image installs beside the dependencies: export (onnx, onnxruntime) and llm
# (transformers, tokenizers: task causal_lm, ray_jobs/llm_*.yaml)
IMAGE_EXTRAS = ("export", "llm")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerfile_torch_version(dockerfile: Path = DOCKERFILE) -> str:
    m = re.search(r"^ARG TORCH_VERSION=(\S+)\s*$", dockerfile.read_text(), re.M)
    if not m:
        raise ValueError(f"{dockerfile}: no `ARG TORCH_VERSION=X`")
    return m.group(1)


def inputs(pyproject: Path = PYPROJECT, dockerfile: Path = DOCKERFILE) -> list[str]:
    """What the lock is resolved from: the dependencies and the image's extra, plus torch at
    the image's version."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    deps = [*project["dependencies"], *(d for x in IMAGE_EXTRAS for d in extras.get(x, []))]
    return [*deps, f"torch=={dockerfile_torch_version(dockerfile)}"]


def digest(reqs: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(r.replace(" ", "") for r in reqs)).encode()).hexdigest()


def parse(text: str) -> tuple[dict[str, str], str | None]:
    """(canonical name -> pinned version, recorded inputs digest) of a lock file."""
    pins, recorded = {}, None
    for ln in text.splitlines():
        ln = ln.strip()
        m = re.fullmatch(r"# inputs-sha256: ([0-9a-f]{64})", ln)
        if m:
            recorded = m.group(1)
        if not ln or ln.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)", ln)
        if not m:
            raise ValueError(f"lock line is not NAME==VERSION: {ln!r}")
        name = canonical(m.group(1))
        if name in pins:
            raise ValueError(f"{name} is pinned twice")
        pins[name] = m.group(2)
    return pins, recorded


def problems(lock_text: str, pyproject: Path = PYPROJECT, dockerfile: Path = DOCKERFILE) -> list[str]:
    """Why the lock does not match pyproject.toml + the Dockerfile (empty: it matches)."""
    from packaging.requirements import Requirement

    try:
        pins, recorded = parse(lock_text)
    except ValueError as e:
        return [str(e)]
    reqs = inputs(pyproject, dockerfile)
    out = []
    for r in map(Requirement, reqs):
        name = canonical(r.name)
        if name not in pins:
            out.append(f"{r.name}: not pinned in the lock")
        elif not r.specifier.contains(pins[name], prereleases=True):
            out.append(f"{r.name}: locked {pins[name]} does not satisfy {str(r.specifier)!r}")
    if recorded != digest(reqs):
        out.append("the lock was generated from other dependencies than pyproject.toml's "
                   "(or another TORCH_VERSION): run python docker/lock.py")
    return out


def resolve(reqs: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        req_file, report = Path(d) / "requirements.txt", Path(d) / "report.json"
        req_file.write_text("\n".join(reqs) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
               "--report", str(report), "--only-binary=:all:", "--python-version", PYTHON_VERSION,
               "--implementation", "cp", "--target", str(Path(d) / "t"), "-r", str(req_file)]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd, check=True)
        installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"].split("+")[0] for i in installs}


def main() -> int:
    reqs = inputs()
    pins = {n: v for n, v in resolve(reqs).items() if not TORCH_OWN.match(n)}
    lines = [
        "# The image's dependency lock (pip constraints): generated by docker/lock.py from",
        "# pyproject.toml's [project] dependencies and the Dockerfile's TORCH_VERSION. Do not edit;",
        "# rerun `python docker/lock.py` after changing either (tests/test_dockerfile.py checks).",
        f"# Resolved for CPython {PYTHON_VERSION}, manylinux x86_64 (the rayproject/ray py311 base);",
        "# torch's CUDA libraries (nvidia-*, cuda-*, triton) come with the torch layer, unpinned here.",
        f"# inputs-sha256: {digest(reqs)}",
        *(f"{n}=={v}" for n, v in sorted(pins.items())),
    ]
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"{LOCK.relative_to(REPO)}: {len(pins)} pins")
    bad = problems(LOCK.read_text())
    for p in bad:
        print(p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
