"""Dockerfile: hadolint-clean, Ray version and CUDA build consistent, non-root, layers that
keep torch cached across code changes, nothing secret in the build context. No docker
daemon or registry is needed: these are static checks."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import k8s_checks as kc

DOCKERFILE = kc.REPO / "Dockerfile"


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [kc.tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_passes():
    out = _hadolint(DOCKERFILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER root\n")
    out = _hadolint(bad)
    assert out.returncode != 0 and "DL3006" in out.stdout, out.stdout


def test_base_image_ray_version_is_the_pinned_one():
    image = kc.dockerfile_base_image()
    assert image.startswith("rayproject/ray:"), image
    assert kc.dockerfile_ray_version() == kc.pyproject_ray_version()


def test_ray_version_mismatch_is_caught(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0"))
    assert kc.dockerfile_ray_version(bad) == "2.59.0" != kc.pyproject_ray_version()


def test_torch_wheel_matches_base_image_cuda():
    args = kc.dockerfile_args()
    cuda = re.search(r"-py311-(\w+)$", kc.dockerfile_base_image()).group(1)
    assert cuda == args["CUDA_TAG"]
    assert args["TORCH_INDEX_URL"].rstrip("/").rsplit("/", 1)[-1] == cuda, args
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), args


def test_runs_as_ray_user():
    users = [i.split(None, 1)[1] for i in kc.dockerfile_instructions() if i.upper().startswith("USER ")]
    assert users and users[-1] in ("1000:100", "1000", "ray", "ray:users"), users


def test_layers_cache_torch_and_deps_across_code_changes():
    steps = kc.dockerfile_instructions()

    def first(pattern):
        hits = [i for i, s in enumerate(steps) if re.search(pattern, s)]
        assert hits, pattern
        return hits[0]

    torch = first(r"^RUN .*pip install .*torch==")
    copy_pyproject = first(r"^COPY .*pyproject\.toml")
    deps = first(r"^RUN .*pip install .*-r ")
    copy_code = first(r"^COPY .*progprune/")
    install_code = first(r"^RUN .*pip install .*--no-deps \.")
    assert torch < copy_pyproject < deps < copy_code < install_code, steps
    # Only pyproject.toml may be copied before the dependency layer.
    assert all("pyproject.toml" in s for s in steps[:deps] if s.startswith(("COPY", "ADD")))


def test_no_secrets_or_data_baked_in():
    for s in kc.dockerfile_instructions():
        op, _, rest = s.partition(" ")
        assert op.upper() != "ADD", f"use COPY (ADD fetches URLs and unpacks archives): {s}"
        if op.upper() in ("ENV", "ARG"):
            assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", rest, re.I), s


def test_dockerignore_is_an_allow_list():
    lines = [
        ln.strip() for ln in (kc.REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert lines[0] == "*", "start from excluding everything, then allow what the image needs"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "LICENSE", "progprune", "ray_jobs"}, allowed
    # Every COPY source must be allowed in, or the build fails on a missing file.
    for s in kc.dockerfile_instructions():
        if s.startswith("COPY"):
            srcs = [a for a in s.split()[1:-1] if not a.startswith("--")]
            assert all(a.rstrip("/") in allowed for a in srcs), s
