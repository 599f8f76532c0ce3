"""The image, built and run for real: `docker build` of the project's Dockerfile, unchanged,
then a small sweep inside the container writing its table to a mounted volume, read back
with pyarrow.

No registry can be reached from CI machines, so the base image is a local stand-in
(tests/standin/Dockerfile) tagged as rayproject/ray:<RAY_VERSION>-py311-cpu, which is what
`--build-arg CUDA_TAG=cpu` asks for, so the classic builder uses it without a pull. It is
built once (about a minute: debootstrap + `docker import` + Ray) and kept by tag; a real
rayproject/ray image already present under that tag is used as it is. The test starts a
docker daemon when none is running and it can (root, dockerd installed: .ci/run installs
docker.io and debootstrap), stops that daemon afterwards, and skips only where no daemon
can be reached or started.

What it proves: the Dockerfile builds (user, permissions, layer order, the lock, the README
pyproject.toml names) and the built image runs a sweep end to end as uid 1000 with no
network. What it cannot: the real base image, the CUDA torch wheels and a GPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import k8s_checks as kc

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(3600)]

REPO = kc.REPO
RAY_VERSION = kc.dockerfile_ray_version()
BASE_TAG = f"rayproject/ray:{RAY_VERSION}-py311-cpu"
ROOTFS_TAG = "local/bookworm-py:1"
IMAGE_TAG = "progprune-test:ci"
DEBIAN_MIRROR = os.environ.get("PROGPRUNE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx on CI machines

SPEC = """\
name: image-smoke
dataset: {name: digits}
models: [resnet20]
speedups: [1.5]
methods: [group_norm]
seeds: [0]
base_training: {epochs: 1, lr: 0.05, batch_size: 64, augment: false}
finetune: {epochs: 1, lr: 0.01, batch_size: 64, augment: false, num_workers: 0, use_gpu: false}
pruning: {global_pruning: true, iterative_steps: 100}
evaluation: {latency_batch_size: 1, latency_repeats: 3}
resources: {gpus_per_task: 0, cpus_per_task: 1, max_concurrent: 1}
output: /work/out
"""


def _docker(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([shutil.which("docker"), *args], capture_output=True, text=True,
                         timeout=timeout, env=ENV, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed ({out.returncode}):\n"
                             f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def _daemon_up() -> bool:
    try:
        return _docker("info", check=False, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _image_exists(tag: str) -> bool:
    return _docker("image", "inspect", tag, check=False).returncode == 0


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory):
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH (apt-get install docker.io; .ci/run does)")
    if _daemon_up():
        yield
        return
    dockerd = shutil.which("dockerd")
    if os.geteuid() != 0 or dockerd is None:
        pytest.skip("no docker daemon is running and none can be started here "
                    "(starting one needs root and dockerd)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([dockerd], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _daemon_up():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:  # only the daemon this test started, by its PID
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rootfs_image() -> None:
    """Debian 12 with Python 3.11, from debootstrap (no registry): local/bookworm-py:1."""
    if _image_exists(ROOTFS_TAG):
        return
    debootstrap = shutil.which("debootstrap")
    assert debootstrap and os.geteuid() == 0, (
        f"neither {BASE_TAG} nor {ROOTFS_TAG} exists and debootstrap (as root) is not available "
        f"to make the stand-in base: apt-get install debootstrap, or docker pull {BASE_TAG}")
    with tempfile.TemporaryDirectory(prefix="progprune-rootfs-") as d:
        root = Path(d) / "rootfs"
        subprocess.run([debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(root), DEBIAN_MIRROR], check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        out = subprocess.run([shutil.which("docker"), "import", "-", ROOTFS_TAG], stdin=tar.stdout,
                             capture_output=True, text=True, timeout=600, env=ENV)
        tar.stdout.close()
        assert tar.wait() == 0 and out.returncode == 0, out.stderr


def _stand_in_base() -> str:
    """rayproject/ray:<RAY_VERSION>-py311-cpu: the real one if present, else the stand-in."""
    if _image_exists(BASE_TAG):
        return "cached"
    _rootfs_image()
    torch_version = kc.dockerfile_args()["TORCH_VERSION"]
    with tempfile.TemporaryDirectory(prefix="progprune-standin-") as d:
        ctx = Path(d)
        shutil.copy(REPO / "tests" / "standin" / "Dockerfile", ctx / "Dockerfile")
        shutil.copy(CA_BUNDLE, ctx / "ca-certificates.crt")
        # The CPU wheel, through pip's own configuration (a local find-links directory on
        # these machines): the torch index itself is not reachable from them.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.11", "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                        "-d", str(ctx / "wheels"), f"torch=={torch_version}"],
                       check=True, capture_output=True, timeout=1200)
        _docker("build", "--network", "host", "--build-arg", f"RAY_VERSION={RAY_VERSION}",
                "-t", BASE_TAG, str(ctx), timeout=1800)
    return "built"


@pytest.fixture(scope="module")
def image(docker_daemon):
    t0 = time.monotonic()
    how = _stand_in_base()
    t1 = time.monotonic()
    # The project's Dockerfile as it is; --network host only because pip reaches the index
    # through the host here.
    # TORCHVISION_VERSION= : the torch wheel index is not reachable here, and PyPI's torchvision
    # does not load beside the local CPU torch wheel (see README, Testing).
    _docker("build", "--network", "host", "--build-arg", "CUDA_TAG=cpu", "--build-arg", "TORCHVISION_VERSION=",
            "-t", IMAGE_TAG, str(REPO), timeout=2400)
    print(f"\nbase {BASE_TAG}: {how} in {t1 - t0:.0f}s; image built in {time.monotonic() - t1:.0f}s")
    return IMAGE_TAG


def test_image_runs_as_ray_user_with_locked_versions(image):
    assert _docker("run", "--rm", "--network", "none", image, "id", "-u").stdout.strip() == "1000"
    freeze = _docker("run", "--rm", "--network", "none", image, "pip", "list", "--format=freeze").stdout
    sys.path.insert(0, str(REPO / "docker"))
    import lock

    installed = {lock.canonical(n): v for n, _, v in (ln.partition("==") for ln in freeze.splitlines()) if v}
    pins, _ = lock.parse((REPO / "docker" / "constraints.txt").read_text())
    off = {n: (v, installed[n]) for n, v in pins.items() if n in installed and installed[n].split("+")[0] != v}
    assert off == {}, f"installed versions differ from the lock: {off}"
    for name in ("ray", "torch", "torch-pruning", "pyarrow", "progprune", "onnxruntime", "transformers",
                 "tokenizers"):  # the export and llm extras too: task causal_lm runs on the cluster
        assert name in installed, sorted(installed)


@pytest.mark.ray  # an embedded Ray inside the container
def test_sweep_inside_the_image(image, tmp_path):
    import pyarrow.parquet as pq

    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)  # the container runs as uid 1000
    (work / "spec.yaml").write_text(SPEC)
    t0 = time.monotonic()
    out = _docker("run", "--rm", "--network", "none", "--shm-size", "8g", "-v", f"{work}:/work", image,
                  "python", "-m", "progprune", "sweep", "/work/spec.yaml", "--output", "/work/out",
                  timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    print(f"\nsweep in the container: {time.monotonic() - t0:.0f}s")
    table = pq.read_table(work / "out" / "results.parquet").to_pylist()
    assert len(table) == 1, table
    row = table[0]
    assert (row["model"], row["dataset"], row["method"], row["status"]) == ("resnet20", "digits", "group_norm", "ok"), row
    assert 1.5 <= row["achieved_speedup"] <= 1.5 * 1.03, row  # the last step's cut: test_crossing.py
    assert row["finetune_epochs"] == 1 and row["final_top1"] is not None
    assert row["ray_version"] == RAY_VERSION and row["torch_version"].startswith(kc.dockerfile_args()["TORCH_VERSION"])
    assert (work / "out" / "results.parquet").stat().st_uid == 1000  # written by the ray user
