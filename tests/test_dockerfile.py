"""Dockerfile: hadolint-clean, Ray version and CUDA build consistent, non-root, layers that
keep torch cached across code changes, nothing secret in the build context. No docker
daemon or registry is needed: these are static checks."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
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


def test_torchvision_is_the_torch_releases_own():
    """tv:NAME models (the ImageNet recipe) need torchvision in the image, built against the
    image's torch (torchvision 0.(N+15) pairs with torch 2.N) and from the same index."""
    args = kc.dockerfile_args()
    torch_minor = int(args["TORCH_VERSION"].split(".")[1])
    assert args["TORCHVISION_VERSION"].split(".")[:2] == ["0", str(torch_minor + 15)], args
    layer = next(i for i in kc.dockerfile_instructions() if "torch==${TORCH_VERSION}" in i)
    assert "torchvision==${TORCHVISION_VERSION}" in layer and "${TORCH_INDEX_URL}" in layer


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
    # Only pyproject.toml and the lock may be copied before the dependency layer.
    early = [s for s in steps[:deps] if s.startswith(("COPY", "ADD"))]
    assert all(set(_copy_sources(s)) <= {"pyproject.toml", "docker/constraints.txt"} for s in early), early
    # ... and the dependency layer installs them under the lock's constraints.
    assert re.search(r"pip install .*-r \S+ .*-c constraints\.txt", steps[deps]), steps[deps]
    assert any("docker/constraints.txt" in _copy_sources(s) for s in early), early


def test_workdir_is_made_by_the_ray_user():
    # Under the classic builder WORKDIR creates a missing directory owned by root, and the
    # non-root `pip install .` cannot write progprune.egg-info there.
    steps = kc.dockerfile_instructions()
    workdir = next(i for i, s in enumerate(steps) if s.startswith("WORKDIR "))
    path = steps[workdir].split(None, 1)[1]
    user = max(i for i, s in enumerate(steps[:workdir]) if s.startswith("USER "))
    assert any(re.search(rf"^RUN .*mkdir (-p )?{re.escape(path)}\b", s) for s in steps[user:workdir]), steps


def test_readme_named_by_pyproject_enters_the_image():
    readme = tomllib.loads((kc.REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert any(readme in _copy_sources(s) for s in kc.dockerfile_instructions() if s.startswith("COPY"))


def _copy_sources(step: str) -> list[str]:
    return [a.rstrip("/") for a in step.split()[1:-1] if not a.startswith("--")]


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
    assert allowed <= {"pyproject.toml", "README.md", "LICENSE", "docker/constraints.txt", "progprune", "ray_jobs"}, allowed
    # Every COPY source must be allowed in, or the build fails on a missing file.
    for s in kc.dockerfile_instructions():
        if s.startswith("COPY"):
            srcs = [a for a in s.split()[1:-1] if not a.startswith("--")]
            assert all(a.rstrip("/") in allowed for a in srcs), s


# ---- the lock (docker/constraints.txt, generated by docker/lock.py) --------------------
sys.path.insert(0, str(kc.REPO / "docker"))
import lock  # noqa: E402

LOCK_TEXT = (kc.REPO / "docker" / "constraints.txt").read_text()


def test_lock_matches_pyproject():
    assert lock.problems(LOCK_TEXT) == []
    pins, _ = lock.parse(LOCK_TEXT)
    assert pins["torch"] == kc.dockerfile_args()["TORCH_VERSION"]
    assert pins["ray"] == kc.pyproject_ray_version()
    assert not any(lock.TORCH_OWN.match(n) for n in pins), "CUDA libraries belong to the torch layer"


def test_lock_mismatch_is_caught(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (kc.REPO / "pyproject.toml").read_text()
    pyproject.write_text(text.replace('"pyarrow>=14"', '"pyarrow>=999"'))
    problems = lock.problems(LOCK_TEXT, pyproject=pyproject)
    assert any("pyarrow: locked" in p for p in problems) and any("run python docker/lock.py" in p for p in problems), problems
    # a new dependency nobody locked
    pyproject.write_text(text.replace('"rich>=13",', '"rich>=13",\n    "not-in-the-lock>=1",'))
    assert any("not-in-the-lock: not pinned" in p for p in lock.problems(LOCK_TEXT, pyproject=pyproject))
    # another TORCH_VERSION in the Dockerfile
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(DOCKERFILE.read_text().replace("ARG TORCH_VERSION=", "ARG TORCH_VERSION=9"))
    assert any("torch: locked" in p for p in lock.problems(LOCK_TEXT, dockerfile=dockerfile))
    # a hand edit that breaks the format
    assert lock.problems(LOCK_TEXT + "numpy>=1\n")


def test_image_installs_the_extras_the_lock_covers():
    """The dependency layer installs exactly lock.IMAGE_EXTRAS (export, and llm for task
    causal_lm), so the lock pins what the image installs."""
    steps = kc.dockerfile_instructions()
    (deps,) = [s for s in steps if "optional-dependencies" in s]
    assert re.findall(r"\['optional-dependencies'\]\['([a-z]+)'\]", deps) == list(lock.IMAGE_EXTRAS)
    pins, _ = lock.parse(LOCK_TEXT)
    assert {"transformers", "tokenizers", "onnxruntime"} <= set(pins)
