"""Hardening (issue 6): faults on a real local Ray cluster, bad input through the real CLI,
and secure defaults (weights-only loading, token auth, nothing open or leaked).

Bad specs and bad checkpoints fail before any cluster is contacted, so they run without one;
the fault tests share one 2-CPU cluster; the token-auth cluster and the embedded Ray are
each started once. Faults come from tests/faults.py, a Ray worker setup hook that
progprune's code does not know about.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from progprune.spec import load_spec
from progprune.storage import Store
from faults import inject
from raycluster import BIN, LocalRay
from test_sweep import ROOT, _env, _table, progprune, tiny_spec


def _local_ray(**kw) -> LocalRay:
    """A LocalRay whose fixed ports lie outside its worker-port range (LocalRay draws them
    independently, so they collide about one start in ten and `ray start` refuses)."""
    while True:
        c = LocalRay(**kw)
        fixed = (c.gcs_port, c.dash_port, c.client_port, c.nm_port, c.om_port, c.agent_port,
                 c.metrics_port, c.rte_port, c.agent_grpc)
        if not any(c.min_worker <= p <= c.max_worker for p in fixed):
            return c
        shutil.rmtree(c.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    with _local_ray(num_cpus=2, env=_env()) as c:
        yield c


def _ids(spec: Path) -> list[str]:
    return sorted(c.combo_id() for c in load_spec(spec).combinations())


def _one_row_each(out: Path, spec: Path):
    df = _table(out)
    assert sorted(df.combo_id) == _ids(spec), df[["combo_id", "status"]]  # one each, no dupes
    return df


def _popen_sweep(*args, env=None) -> subprocess.Popen:
    # its own session: we can kill it, and everything it started, without touching others
    return subprocess.Popen([str(BIN / "progprune"), "sweep", *map(str, args)], cwd=ROOT,
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sweep exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            _kill_session(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _session_pids(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process we started and every process in its session (an embedded Ray's
    GCS, raylet, agents and workers), then reap it so its pid is really gone."""
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


# ---- faults on a real cluster ---------------------------------------------------------
def test_killed_prune_worker_is_retried_and_the_sweep_finishes(cluster, tmp_path):
    spec = tiny_spec(tmp_path)
    markers = tmp_path / "faults"
    r = progprune("sweep", spec, "--address", cluster.address,
                  env=_env(**inject("kill:prune:vgg11:2.0", markers)), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    df = _one_row_each(out, spec)
    assert (df.status == "ok").all(), df[["combo_id", "status", "error"]]
    (killed,) = [c for c in load_spec(spec).combinations() if c.model == "vgg11" and c.target_speedup == 2.0]
    assert [p.name for p in markers.iterdir()] == [f"{killed.combo_id()}-prune"]  # the SIGKILL really happened


def test_killed_driver_then_rerun_runs_only_what_is_missing(cluster, tmp_path):
    spec = tiny_spec(tmp_path, resources={"max_concurrent": 1})
    out = tmp_path / "out"
    total = len(_ids(spec))
    proc = _popen_sweep(spec, "--address", cluster.address)
    _wait_for(lambda: any((out / "rows").glob("*.parquet")), proc, 600, "the first row fragment")
    _kill_session(proc)
    assert (out / ".lock").exists()  # left behind by the killed driver
    time.sleep(2)  # let anything the dead driver's tasks were writing land before we look
    kept = {p: p.stat().st_mtime_ns for p in (out / "rows").glob("*.parquet")}
    kept |= {p: p.stat().st_mtime_ns for p in (out / "bases").glob("*.pt")}
    assert 1 <= len(list((out / "rows").glob("*.parquet"))) < total

    r = progprune("sweep", spec, "--address", cluster.address, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if "to run" in ln)
    assert int(line.split("to run")[1].split(";")[0]) < total, line
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished work and bases reused
    df = _one_row_each(out, spec)
    assert (df.status == "ok").all()
    assert not (out / ".lock").exists()


def test_killed_train_worker_resumes_from_its_checkpoint(cluster, tmp_path):
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5],
                     finetune={"epochs": 3, "batch_size": 32, "augment": False,
                               "num_workers": 1, "max_failures": 1})
    markers = tmp_path / "faults"
    r = progprune("sweep", spec, "--address", cluster.address,
                  env=_env(**inject("kill:finetune:resnet20:1.5", markers)), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    df = _one_row_each(out, spec)
    assert df.status.tolist() == ["ok"]
    assert df.finetune_workers.tolist() == [1]
    # killed after its epoch-1 report: restarted from a registered checkpoint, not from scratch
    assert df.finetune_resumed_from_epoch.iloc[0] in (0, 1), df.finetune_resumed_from_epoch
    assert len(list(markers.iterdir())) == 1  # the SIGKILL really happened
    assert "finetune epoch 3/3" in r.stdout and list((out / "combos").glob("*/final.pt"))


def test_two_sweeps_on_one_output_second_refuses(cluster, tmp_path):
    spec = tiny_spec(tmp_path, models=["resnet20"])
    out = tmp_path / "out"
    first = _popen_sweep(spec, "--address", cluster.address)
    _wait_for(lambda: (out / ".lock").exists(), first, 300, "the first sweep's lock")
    second = progprune("sweep", spec, "--address", cluster.address, timeout=120)
    stdout, stderr = first.communicate(timeout=600)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.startswith("error: output") and "in use by another sweep" in second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    df = _one_row_each(out, spec)
    assert (df.status == "ok").all()
    assert sorted(p.stem for p in (out / "rows").glob("*.parquet")) == _ids(spec)


# The absurd target (1000x -> an `unreachable` row, exit 0, no loop) is
# test_sweep.py::test_unreachable_target_is_a_row_not_an_error; unwritable output and a
# dead --address are test_sweep.py's too.


# ---- bad input through the real CLI: exit 2, one line, nothing written ----------------
class Evil:
    """A pickle that runs a shell command when loaded (what weights-only loading refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_bad_cases(root: Path) -> dict:
    """id -> (spec path, output dir, text the one error line must contain)."""
    import torch

    from progprune.artifacts import save_artifact
    from progprune.models import build_model

    files = root / "files"
    files.mkdir()
    # fixed bytes: seed 2 makes torch's weights-only unpickler raise IndexError, not
    # UnpicklingError; protocol 17 makes it print a multi-line UserWarning first
    (files / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (files / "random-indexerror.pt").write_bytes(random.Random(2).randbytes(4096))
    (files / "odd-protocol.pt").write_bytes(b"\x80\x11N.")
    save_artifact(files / "vgg11.pt", build_model("vgg11", 4), model_name="vgg11", num_classes=4)
    save_artifact(files / "resnet20-10.pt", build_model("resnet20", 10), model_name="resnet20", num_classes=10)
    torch.save({"state_dict": Evil(root / "pwned")}, files / "evil.pt")
    (files / "cifar-empty").mkdir()

    ck = lambda f: {"models": [{"name": "resnet20", "checkpoint": str(files / f)}]}  # noqa: E731
    cases = {
        "unknown-field": ({"finetun": {"epochs": 1}}, "finetun: unknown field; did you mean 'finetune'"),
        "unknown-nested-field": ({"pruning": {"iterative_step": 5}}, "pruning.iterative_step: unknown field; did you mean 'iterative_steps'"),
        "wrong-type-seeds": ({"seeds": ["zero"]}, "seeds[0]: must be an integer"),
        "speedup-1": ({"speedups": [1.0, 2.0]}, "speedups[0]: must be a number > 1"),
        "empty-speedups": ({"speedups": []}, "speedups: must not be empty"),
        "duplicate-speedups": ({"speedups": [2.0, 2.0]}, "speedups: duplicate entry"),
        "negative-epochs": ({"base_training": {"epochs": -2}}, "base_training.epochs: must be an integer in [0, 10000], got -2"),
        "negative-lr": ({"finetune": {"lr": -0.01}}, "finetune.lr: must be a number in (0, 10], got -0.01"),
        "unknown-method": ({"methods": ["group_nrom"]}, "methods[0]: unknown method 'group_nrom'; did you mean 'group_norm'"),
        "unknown-dataset": ({"dataset": {"name": "imagenet"}}, "dataset.name: unknown dataset 'imagenet'"),
        "unknown-model": ({"models": [{"name": "resnet_20"}]}, "models[0].name: unknown model 'resnet_20'"),
        "checkpoint-missing": (ck("nope.pt"), "models[0].checkpoint: file not found"),
        "checkpoint-corrupt": (ck("random.pt"), "models[0].checkpoint: checkpoint"),
        "checkpoint-corrupt-indexerror": (ck("random-indexerror.pt"), "models[0].checkpoint: checkpoint"),
        "checkpoint-odd-protocol": (ck("odd-protocol.pt"), "models[0].checkpoint: checkpoint"),
        "checkpoint-other-arch": (ck("vgg11.pt"), "holds a vgg11, not a resnet20"),
        "checkpoint-other-classes": (ck("resnet20-10.pt"), "has 10 classes, the dataset has 4"),
        "checkpoint-malicious-pickle": (ck("evil.pt"), "refused: it would import"),
        "cifar-missing-files": ({"dataset": {"name": "cifar10", "data_dir": str(files / "cifar-empty")}}, "dataset.data_dir"),
        "num-classes-mismatch": ({"dataset": {"name": "digits", "num_classes": 7}}, "dataset.num_classes: digits has 10 classes, got 7"),
        "output-scheme": ({"output": "http://example.com/runs"}, "output: unsupported scheme 'http'"),
    }
    out = {}
    for name, (over, message) in cases.items():
        d = root / name
        d.mkdir()
        out[name] = (tiny_spec(d, **over), d / "out", message)
    d = root / "yaml-syntax"
    d.mkdir()
    bad = d / "bad.yaml"
    bad.write_text(f"name: y\noutput: {d / 'out'}\nmodels: [resnet20\nspeedups: [2]\n")
    out["yaml-syntax"] = (bad, d / "out", "YAML syntax error at line 4, column 9")
    return out


BAD_IDS = ["yaml-syntax", "unknown-field", "unknown-nested-field", "wrong-type-seeds",
           "speedup-1", "empty-speedups", "duplicate-speedups",
           "negative-epochs", "negative-lr", "unknown-method", "unknown-dataset",
           "unknown-model", "checkpoint-missing", "checkpoint-corrupt",
           "checkpoint-corrupt-indexerror", "checkpoint-odd-protocol", "checkpoint-other-arch",
           "checkpoint-other-classes", "checkpoint-malicious-pickle", "cifar-missing-files",
           "num-classes-mismatch", "output-scheme"]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad case through `progprune sweep`, a few at a time (each is mostly import time)."""
    root = tmp_path_factory.mktemp("bad")
    cases = _write_bad_cases(root)
    assert sorted(cases) == sorted(BAD_IDS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(cases, pool.map(lambda c: progprune("sweep", c[0], timeout=120), cases.values())))
    return {k: (runs[k], *cases[k][1:], root) for k in cases}


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_exits_2_with_one_line(bad_runs, case):
    r, out, message, _ = bad_runs[case]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()


def test_malicious_checkpoint_never_runs(bad_runs):
    *_, root = bad_runs["checkpoint-malicious-pickle"]
    assert not (root / "pwned").exists()
    # and the same file does run its command under a plain pickle load: the test has teeth
    import torch

    probe = root / "files" / "evil-probe.pt"
    torch.save(Evil(root / "pwned-probe"), probe)
    torch.load(probe, weights_only=False)
    assert (root / "pwned-probe").exists()


# ---- secure defaults ------------------------------------------------------------------
def test_store_never_shows_uri_credentials():
    secret = "S3CR3T" + secrets.token_hex(8)
    s = Store(f"s3://AKIAKEY:{secret}@bucket/runs?region=us-east-1&endpoint_override=127.0.0.1:9")
    for text in (repr(s), s.display(), s.display("results.parquet")):
        assert secret not in text and "AKIAKEY" not in text, text
        assert "bucket" in text


def test_job_api_needs_the_token(tmp_path):
    token = secrets.token_hex(32)  # the shape Ray's own generator makes
    py = sys.executable
    with _local_ray(num_cpus=1, env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)) as c:
        home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
        home.mkdir()
        base = _env(HOME=str(home))
        base.pop("RAY_AUTH_TOKEN", None)
        submit = [str(BIN / "ray"), "job", "submit", "--address", c.dashboard, "--", py, "-c", "print(42)"]
        without = subprocess.run(submit, env={**base, "RAY_AUTH_MODE": "disabled"},
                                 capture_output=True, text=True, timeout=120)
        assert without.returncode != 0
        said = (without.stdout + without.stderr).lower()
        assert any(w in said for w in ("401", "unauthorized", "authentication", "auth token")), said[-2000:]
        assert "42\n" not in without.stdout
        with_token = subprocess.run(submit, env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                                    capture_output=True, text=True, timeout=180)
        assert with_token.returncode == 0, with_token.stdout[-2000:] + with_token.stderr[-2000:]
        assert "42" in with_token.stdout


def _listeners(pids: list[int]) -> dict[int, list[tuple[str, int]]]:
    """pid -> [(ip, port)] of its listening TCP sockets, from /proc/net/tcp{,6}."""
    import ipaddress

    by_inode = {}
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(fn).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
            ip = ipaddress.ip_address(raw)
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            by_inode[f[9]] = (str(ip), int(hexport, 16))
    out = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        socks = [by_inode[ln[8:-1]] for ln in links if ln.startswith("socket:[") and ln[8:-1] in by_inode]
        if socks:
            out[pid] = socks
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_GCS_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    keys = GcsClient(address=sys.argv[1]).internal_kv_keys(b"", namespace=None, timeout=10)
    print("ANSWERED", len(keys))
except Exception as e:
    print("REFUSED", type(e).__name__, str(e).splitlines()[0][:200])
"""


def _probe_embedded(proc: subprocess.Popen, tmp_path: Path) -> dict:
    """While the embedded Ray of a running sweep is up: what listens where, and whether its
    GCS and its dashboard agent's job API answer a caller that has no token."""
    state = {}

    def ready():
        pids = _session_pids(proc.pid)
        gcs = [p for p in pids if "gcs_server" in _cmdline(p)]
        raylet = [p for p in pids if "raylet/raylet" in _cmdline(p)]
        if not gcs or not raylet:
            return False
        ls = _listeners(pids)
        args = _cmdline(raylet[0]).split()
        agent_port = next((int(a.split("=")[1]) for a in args if a.startswith("--listen-port=")), None)
        ports = {port for v in ls.values() for _, port in v}
        if not ls.get(gcs[0]) or agent_port not in ports:
            return False
        state.update(pids=pids, listeners=ls, gcs=ls[gcs[0]], agent_port=agent_port)
        return True

    _wait_for(ready, proc, 300, "the embedded Ray to listen")
    everyone = [a for v in state["listeners"].values() for a in v]
    # call from the network side where Ray is reachable there; the wildcard ports take any address
    outside = next((ip for ip, _ in everyone if ip not in ("127.0.0.1", "::1", "0.0.0.0", "::")), "127.0.0.1")
    home = tmp_path / "probe-home"
    home.mkdir(exist_ok=True)
    env = _env(HOME=str(home), RAY_AUTH_MODE="disabled")
    env.pop("RAY_AUTH_TOKEN", None)
    gcs_port = state["gcs"][0][1]
    r = subprocess.run([sys.executable, "-c", _GCS_PROBE, f"{outside}:{gcs_port}"], env=env,
                       capture_output=True, text=True, timeout=60)
    state["gcs_probe"] = r.stdout.strip() or r.stderr[-500:]
    req = urllib.request.Request(f"http://{outside}:{state['agent_port']}/api/job_agent/jobs/", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            state["job_api"] = resp.status
    except urllib.error.HTTPError as e:
        state["job_api"] = e.code
    except OSError as e:
        state["job_api"] = f"unreachable: {e}"
    state["outside"] = outside
    state["still_running"] = proc.poll() is None
    return state


def _embedded_sweep(tmp_path: Path, train: bool = False, **env) -> tuple[subprocess.Popen, Path, Path]:
    """A tiny sweep on an embedded Ray whose first prune waits for `<tmp>/faults/release`
    (`_release`), so the probe sees it running however fast the machine is. `train`: one
    combination, fine-tuned through Ray Train (one worker) instead of two in-task."""
    home = tmp_path / "home"  # the embedded Ray writes its token here, not in the real ~/.ray
    home.mkdir()
    grid = ({"speedups": [1.5], "finetune": {"epochs": 1, "batch_size": 32, "augment": False, "num_workers": 1}}
            if train else {"speedups": [1.5, 2.0]})
    spec = tiny_spec(tmp_path, models=["resnet20"], resources={"max_concurrent": 1}, **grid)
    e = _env(HOME=str(home), **inject("hold:prune:resnet20:1.5", tmp_path / "faults"), **env)
    for k in {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} - env.keys():
        e.pop(k, None)
    return _popen_sweep(spec, env=e), spec, tmp_path / "out"


def _release(tmp_path: Path) -> None:
    (tmp_path / "faults").mkdir(parents=True, exist_ok=True)
    (tmp_path / "faults" / "release").write_text("probed")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One tiny sweep on an embedded Ray (no --address), with cloud credentials in its
    environment, probed from outside while it runs."""
    tmp = tmp_path_factory.mktemp("embedded")
    creds = {"AWS_SECRET_ACCESS_KEY": "sk" + secrets.token_hex(20),
             "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper()}
    proc, spec, out = _embedded_sweep(tmp, train=True, **creds)
    try:
        probe = _probe_embedded(proc, tmp)
        _release(tmp)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            _kill_session(proc)
    return {"probe": probe, "rc": proc.returncode, "stdout": stdout, "stderr": stderr,
            "spec": spec, "out": out, "creds": creds, "held": (tmp / "faults" / "held").exists()}


def test_embedded_sweep_runs_and_keeps_ray_closed(embedded):
    """Ray 2.60 binds its gRPC servers (GCS, raylet, workers) to every interface and the
    dashboard agent to the node's address whatever `_node_ip_address` says, so "listens on
    127.0.0.1 only" cannot hold; what must hold is that nothing answers without the token."""
    assert embedded["rc"] == 0, embedded["stdout"][-3000:] + embedded["stderr"][-3000:]
    _one_row_each(embedded["out"], embedded["spec"])
    p = embedded["probe"]
    assert embedded["held"], "the first prune was not held while the probe looked"
    assert p["still_running"], "the sweep ended before it could be probed"
    assert p["gcs_probe"].startswith("REFUSED") and "auth" in p["gcs_probe"].lower(), p
    assert p["job_api"] == 401, p
    # the output is the sweep's own: the combination's lines, none of Ray Train's chatter, and
    # nothing from its placement-group cleaner, which cannot reach the state API without a
    # dashboard (it warned once a second per Train run, or died with a traceback)
    log = embedded["stdout"] + embedded["stderr"]
    assert "[resnet20 group_norm 1.5x seed 0] finetune epoch 1/1" in log, log[-3000:]
    for chatter in ("PlacementGroupCleaner", "Reporting training result", "Requesting resources"):
        assert chatter not in log, chatter


def test_embedded_ray_stays_closed_when_auth_is_disabled_in_the_env(tmp_path):
    """RAY_AUTH_MODE=disabled (LocalRay sets it; users copy it) must not open the embedded
    cluster's job API and GCS to the network."""
    proc, _, _ = _embedded_sweep(tmp_path, RAY_AUTH_MODE="disabled")
    try:
        p = _probe_embedded(proc, tmp_path)
    finally:
        _kill_session(proc)
    assert p["still_running"], "the sweep ended before it could be probed"
    open_ = [f"{ip}:{port}" for v in p["listeners"].values() for ip, port in v if ip not in ("127.0.0.1", "::1")]
    assert p["job_api"] == 401, (f"job API at {p['outside']}:{p['agent_port']} answered {p['job_api']} "
                                 f"without a token; listening beyond loopback: {open_}")
    assert p["gcs_probe"].startswith("REFUSED"), p["gcs_probe"]


def test_no_credentials_in_logs_rows_or_reports(embedded):
    assert embedded["rc"] == 0, embedded["stderr"][-3000:]
    out = embedded["out"]
    secrets_ = [v.encode() for v in embedded["creds"].values()]
    for text in (embedded["stdout"], embedded["stderr"]):
        assert not any(s.decode() in text for s in secrets_)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and (out / "spec.resolved.yaml") in files
    assert any(p.is_relative_to(out / "report") for p in files)
    for p in files:
        if p.suffix == ".parquet":  # compressed pages: read the strings back
            t = pq.read_table(p)
            blob = json.dumps([t.column(c).to_pylist() for c in t.column_names
                               if pa.types.is_string(t.schema.field(c).type)]).encode()
        else:
            blob = p.read_bytes()
        assert not any(s in blob for s in secrets_), p


def test_force_never_replaces_ok_rows_with_failures(cluster, tmp_path):
    """Issue 14 #2: `--force` retrains what it reruns (a broken stored base is replaced,
    not loaded), and a rerun that fails keeps the finished row and says so."""
    spec = tiny_spec(tmp_path, models=["resnet20"], speedups=[1.5])
    out = tmp_path / "out"
    assert progprune("sweep", spec, "--address", cluster.address).returncode == 0
    (base,) = (out / "bases").glob("*.pt")
    base.write_bytes(b"garbage")  # a broken stored base
    r = progprune("sweep", spec, "--address", cluster.address, "--force")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (_one_row_each(out, spec).status == "ok").all()
    before = (out / "rows").glob("*.parquet").__next__().read_bytes()
    r = progprune("sweep", spec, "--address", cluster.address, "--force",
                  env=_env(**inject("raise:prune:resnet20:1.5", tmp_path / "faults")))
    assert r.returncode == 1 and "kept the earlier ok row" in r.stdout, r.stdout[-3000:]
    assert (_one_row_each(out, spec).status == "ok").all()
    assert (out / "rows").glob("*.parquet").__next__().read_bytes() == before
