"""manifests/: every overlay renders offline and passes the checks of tests/k8s_checks.py;
broken variants of a rendered RayJob prove that each check can fail."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import k8s_checks as kc

MANIFESTS = kc.REPO / "manifests"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
TOOLS = sorted(p.parent for p in (MANIFESTS / "tools").glob("*/kustomization.yaml"))
SPEC_COPIES = sorted((MANIFESTS / "overlays").glob("*/specs/*.yaml"))


@pytest.fixture(scope="module")
def versions() -> dict:
    return {
        "image_ray_version": kc.dockerfile_ray_version(),
        "pinned_ray_version": kc.pyproject_ray_version(),
    }


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {p.name: kc.render(p) for p in OVERLAYS}


def test_tools_present():
    # .ci/run installs them (test extra); a missing one is an error, never a skip.
    for name in ("kubectl", "hadolint"):
        assert Path(kc.tool(name)).is_file()
    assert (kc.KUBERAY_SCHEMAS / "rayjob-ray.io-v1.json").is_file(), kc.KUBERAY_SCHEMAS


def test_expected_overlays():
    assert {"gpu", "cpu-smoke", "gpu-imagenet", "gpu-s3", "gpu-llm"} <= {p.name for p in OVERLAYS}


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_overlay_passes_every_check(overlay, rendered, versions):
    objs = rendered[overlay]
    assert {o["kind"] for o in objs} >= {"RayJob", "ConfigMap", "PersistentVolumeClaim"}
    assert kc.all_problems(objs, **versions) == []


@pytest.mark.parametrize("tool_dir", [p.name for p in TOOLS])
def test_tool_manifests_pass_every_check(tool_dir, versions):
    objs = kc.render(MANIFESTS / "tools" / tool_dir)
    assert objs and kc.all_problems(objs, need_rayjob=False, **versions) == []


def test_one_image_everywhere(rendered):
    objs = {f"overlays/{k}": v for k, v in rendered.items()}
    objs |= {f"tools/{d.name}": kc.render(d) for d in TOOLS}
    images = {k: {c["image"] for o in v for _, c in kc.containers(o) if "image" in c} for k, v in objs.items()}
    assert len(set().union(*images.values())) == 1, f"point every images: field at one tag: {images}"


def test_ray_versions_agree(versions, rendered):
    assert versions["image_ray_version"] == versions["pinned_ray_version"]
    for objs in rendered.values():
        for rj in (o for o in objs if o["kind"] == "RayJob"):
            assert rj["spec"]["rayClusterSpec"]["rayVersion"] == versions["pinned_ray_version"]


@pytest.mark.parametrize("copy_path", SPEC_COPIES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_spec_copies_match_ray_jobs(copy_path):
    # kustomize reads no file outside the kustomization root, so overlays hold copies.
    original = kc.REPO / "ray_jobs" / copy_path.name
    assert original.is_file(), f"{copy_path} copies ray_jobs/{copy_path.name}, which is gone"
    assert copy_path.read_bytes() == original.read_bytes(), (
        f"{copy_path.relative_to(kc.REPO)} differs from ray_jobs/{copy_path.name}: "
        f"cp ray_jobs/{copy_path.name} {copy_path.relative_to(kc.REPO)}"
    )


def test_overlay_recipes(rendered):
    gpu = _rayjob(rendered["gpu"])
    smoke = _rayjob(rendered["cpu-smoke"])
    assert _spec_name(rendered["gpu"]) == "cifar10-resnet56"
    assert _spec_name(rendered["cpu-smoke"]) == "digits-smoke"
    for rj in (gpu, smoke):
        spec = rj["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert {"ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"} <= set(spec)
        assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["entrypoint"].startswith("python -m progprune sweep /config/spec.yaml --output /data/results/")
    g = gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in g["template"]["spec"]["tolerations"]
    assert g["maxReplicas"] >= g["minReplicas"]
    for w in smoke["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        pod = w["template"]["spec"]
        assert "tolerations" not in pod
        assert "nvidia.com/gpu" not in str(pod) and "num-gpus" not in w["rayStartParams"]


def test_llm_overlay(rendered):
    """gpu-llm: the causal-LM recipe on 1-GPU workers, its token and transformers caches on
    the shared volume for the head (the driver's preflight) and every worker, no Hub calls."""
    objs = rendered["gpu-llm"]
    assert _spec_name(objs) == "llm-qwen2p5-0p5b"
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert yaml.safe_load(cm["data"]["spec.yaml"])["task"] == "causal_lm"
    rj = _rayjob(objs)
    assert rj["metadata"]["name"] == "progprune-llm-qwen2p5-0p5b"
    assert rj["spec"]["entrypoint"] == "python -m progprune sweep /config/spec.yaml --output /data/results/llm-qwen2p5-0p5b"
    cluster = rj["spec"]["rayClusterSpec"]
    (g,) = cluster["workerGroupSpecs"]
    assert g["rayStartParams"]["num-gpus"] == "1" and g["maxReplicas"] >= 4  # 2 fine-tunes x 2 Train workers
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["memory"] == "48Gi"
    for pod in (cluster["headGroupSpec"]["template"]["spec"], g["template"]["spec"]):
        c = pod["containers"][0]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env == {"PROGPRUNE_CACHE": "/data/cache/progprune", "HF_HOME": "/data/cache/huggingface",
                       "HF_HUB_OFFLINE": "1"}
        assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])


def test_llm_overlay_spec_is_checked_as_a_causal_lm(rendered, versions):
    """progprune's own loader reads the gpu-llm ConfigMap as a causal-LM spec: an image-only
    method or target in it is a problem of the rendered overlay."""
    objs = copy.deepcopy(rendered["gpu-llm"])
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    cm["data"]["spec.yaml"] = cm["data"]["spec.yaml"].replace("methods: [l2, taylor]", "methods: [l2, slim]")
    problems = kc.all_problems(objs, **versions)
    assert any("methods[1]: slim does not apply to causal LMs" in p for p in problems), problems


@pytest.mark.parametrize("overlay", [p.name for p in OVERLAYS])
def test_shared_volume_on_head_and_workers(overlay, rendered):
    objs = rendered[overlay]
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    cluster = _rayjob(objs)["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claim.get(mounts.get("/data")) in pvcs, f"{overlay}: /data is not the shared PVC"
    # One-node laptop clusters (cpu-smoke) get ReadWriteOnce; every real cluster RWX.
    if overlay != "cpu-smoke":
        assert all(p["spec"]["accessModes"] == ["ReadWriteMany"] for p in pvcs.values())


# ---- negative tests: each broken variant is caught ------------------------------------
def _rayjob(objs):
    (rj,) = [o for o in objs if o["kind"] == "RayJob"]
    return rj


def _spec_name(objs):
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    return yaml.safe_load(cm["data"]["spec.yaml"])["name"]


def _broken(rendered, mutate):
    objs = copy.deepcopy(rendered["gpu"])
    mutate(_rayjob(objs), objs)
    return objs


def _cluster(rj):
    return rj["spec"]["rayClusterSpec"]


def _worker(rj):
    return _cluster(rj)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


BROKEN = {
    "misspelled field": (
        lambda rj, _: rj["spec"].__setitem__("shutdownAfterJobFinish", rj["spec"].pop("shutdownAfterJobFinishes")),
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "misspelled pod field": (
        lambda rj, _: _worker(rj).__setitem__("volumeMount", _worker(rj).pop("volumeMounts")),
        "'volumeMount' was unexpected",
    ),
    "int rayStartParams": (
        lambda rj, _: _cluster(rj)["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        "rayStartParams.num-cpus: 0 is not of type 'string'",
    ),
    "ray version mismatch": (
        lambda rj, _: _cluster(rj).__setitem__("rayVersion", "2.59.0"),
        "rayVersion '2.59.0'",
    ),
    "latest image": (
        lambda rj, _: _worker(rj).__setitem__("image", "ghcr.io/example/progprune:latest"),
        ":latest",
    ),
    "untagged image": (
        lambda rj, _: _worker(rj).__setitem__("image", "ghcr.io/example/progprune"),
        "has no tag",
    ),
    "both rayClusterSpec and clusterSelector": (
        lambda rj, _: rj["spec"].__setitem__("clusterSelector", {"ray.io/cluster": "x"}),
        "exactly one of",
    ),
    "ttl without shutdown": (
        lambda rj, _: rj["spec"].__setitem__("shutdownAfterJobFinishes", False),
        "ttlSecondsAfterFinished requires",
    ),
    "suspend without shutdown": (
        lambda rj, _: (rj["spec"].pop("ttlSecondsAfterFinished"), rj["spec"].update(suspend=True, shutdownAfterJobFinishes=False)),
        "suspend requires",
    ),
    "backoffLimit in InteractiveMode": (
        lambda rj, _: rj["spec"].update(submissionMode="InteractiveMode"),
        "InteractiveMode",
    ),
    "submitter template in SidecarMode": (
        lambda rj, _: rj["spec"].update(submissionMode="SidecarMode"),
        "not allowed in SidecarMode",
    ),
    "unknown submissionMode": (
        lambda rj, _: rj["spec"].update(submissionMode="JobMode"),
        "not one of",
    ),
    "privilege escalation": (
        lambda rj, _: _worker(rj)["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation",
    ),
    "root user": (
        lambda rj, _: _worker(rj)["securityContext"].update(runAsUser=0),
        "runAsUser",
    ),
    "no memory limit": (
        lambda rj, _: _worker(rj)["resources"]["limits"].pop("memory"),
        "limits.memory missing",
    ),
    "NodePort head service": (
        lambda rj, _: _cluster(rj)["headGroupSpec"].update(serviceType="NodePort"),
        "ClusterIP",
    ),
    "LoadBalancer Service": (
        lambda rj, objs: objs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
                                      "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}),
        "LoadBalancer",
    ),
    "inline credential": (
        lambda rj, _: _worker(rj).setdefault("env", []).append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
        "inline value",
    ),
    "spec path not in ConfigMap": (
        lambda rj, _: rj["spec"].update(entrypoint="progprune sweep /config/other.yaml --output /data/results/x"),
        "has keys ['spec.yaml']",
    ),
    "invalid spec in ConfigMap": (
        lambda rj, objs: [o for o in objs if o["kind"] == "ConfigMap"][0]["data"].update(
            {"spec.yaml": "name: x\nmodels: [resnet56]\nspeedups: [0.5]\nmethodz: [l1]\n"}),
        "speedups",
    ),
    "own /dev/shm on a worker": (
        lambda rj, _: (
            _worker(rj)["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"}),
            _cluster(rj)["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}),
        ),
        "mounts its own /dev/shm",
    ),
    "no preStop on the head": (
        lambda rj, _: _cluster(rj)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("lifecycle"),
        "preStop must exec `ray stop`",
    ),
    "entrypoint not progprune sweep": (
        lambda rj, _: rj["spec"].update(entrypoint="python -m progprune report /data/results/x"),
        "is not `python -m progprune sweep",
    ),
    "bad core object": (
        lambda rj, objs: [o for o in objs if o["kind"] == "PersistentVolumeClaim"][0]["spec"].update(accesModes=["ReadWriteMany"]),
        "'accesModes' was unexpected",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_checks_catch(case, rendered, versions):
    mutate, expected = BROKEN[case]
    problems = kc.all_problems(_broken(rendered, mutate), **versions)
    assert any(expected in p for p in problems), problems


def test_unknown_kind_is_not_waved_through():
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert kc.schema_problems(obj) and "no schema" in kc.schema_problems(obj)[0]


def test_repository_stands_alone():
    """Code, tests and docs read no file outside the repository (the KubeRay schemas are
    vendored in tests/kuberay_schemas/); upstream material is cited by URL."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z"], cwd=kc.REPO, capture_output=True, check=True).stdout
    # a relative or absolute path to the shared folder beside the checkout (split so that
    # this file does not match itself)
    outside = re.compile(r"\.\./shared/|/work" + r"/shared|parent\s*/\s*[\"']shared[\"']")
    hits = []
    for rel in filter(None, files.decode().split("\0")):
        path = kc.REPO / rel
        if path.suffix in (".json", ".whl", ".png", ".parquet") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert hits == [], hits
