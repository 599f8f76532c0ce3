"""progprune.cluster: its secure defaults, then its scheduling loop.

Secure defaults (issue 6): the job API of a token-auth cluster refuses a caller without the
token; a sweep's embedded Ray (no --address) answers nothing without its token, even when
RAY_AUTH_MODE=disabled is in the environment, and no credential reaches a log, row or report.

The scheduling loop's submission window (issue 13 §3) on a real local Ray: `cluster.execute`
submits real Ray tasks and takes them back with Ray's own `ray.wait`/`ray.get`. Only the four
stage tasks are swapped for trivial `@ray.remote` functions (no model, no data: what is
tested is the window, not the stages or Ray Train), and the driver counts their submissions
(`Counted`) against the rows in the results table. The driver's other parts are the real
ones: `make_plan`, `ResultsTable`, the output's lock, `_Progress`, `write_fragment`.
A sweep larger than the window ends with exactly one row per combination, in plan order of
submission, while no more than the window's combinations are ever in flight, and the window
is filled; Train runs (fine-tune coordinators with num_workers > 0, counted as they are
submitted) stay capped at `max_concurrent`; the driver's refs (Ray's own reference table)
stay bounded by the window.
"""
from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
import ray  # noqa: E402
from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from rich.console import Console  # noqa: E402

import progprune.cluster as cluster  # noqa: E402
import progprune.cluster.tasks as tasks  # noqa: E402
from progprune.results import ResultRow  # noqa: E402
from progprune.spec import load_spec_dict  # noqa: E402
from progprune.storage import Store, row_parts  # noqa: E402
from progprune.sweep import _Progress, _table, make_plan  # noqa: E402
from faults import inject  # noqa: E402
from helpers import kill_session, one_row_each, popen_sweep, run_env, session_pids, tiny_spec, wait_for  # noqa: E402
from raycluster import BIN, LocalRay  # noqa: E402

pytestmark = pytest.mark.ray


# ---- secure defaults of a cluster (issue 6): token auth, the embedded Ray kept closed, no
# credentials leaked. Before the window's tests: their in-process Ray sets token auth in
# this process's environment until the module ends.
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


@pytest.mark.ray(own_cluster=True)  # a LocalRay of its own and `ray job submit`: no embedded Ray
def test_job_api_needs_the_token(tmp_path):
    token = secrets.token_hex(32)  # the shape Ray's own generator makes
    py = sys.executable
    with _local_ray(num_cpus=1, env=run_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)) as c:
        home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
        home.mkdir()
        base = run_env(HOME=str(home))
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
        pids = session_pids(proc.pid)
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

    wait_for(ready, proc, 300, "the embedded Ray to listen")
    everyone = [a for v in state["listeners"].values() for a in v]
    # call from the network side where Ray is reachable there; the wildcard ports take any address
    outside = next((ip for ip, _ in everyone if ip not in ("127.0.0.1", "::1", "0.0.0.0", "::")), "127.0.0.1")
    home = tmp_path / "probe-home"
    home.mkdir(exist_ok=True)
    env = run_env(HOME=str(home), RAY_AUTH_MODE="disabled")
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
    e = run_env(HOME=str(home), **inject("hold:prune:resnet20:1.5", tmp_path / "faults"), **env)
    for k in {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} - env.keys():
        e.pop(k, None)
    return popen_sweep(spec, env=e), spec, tmp_path / "out"


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
            kill_session(proc)
    return {"probe": probe, "rc": proc.returncode, "stdout": stdout, "stderr": stderr,
            "spec": spec, "out": out, "creds": creds, "held": (tmp / "faults" / "held").exists()}


def test_embedded_sweep_runs_and_keeps_ray_closed(embedded):
    """Ray 2.60 binds its gRPC servers (GCS, raylet, workers) to every interface and the
    dashboard agent to the node's address whatever `_node_ip_address` says, so "listens on
    127.0.0.1 only" cannot hold; what must hold is that nothing answers without the token."""
    assert embedded["rc"] == 0, embedded["stdout"][-3000:] + embedded["stderr"][-3000:]
    one_row_each(embedded["out"], embedded["spec"])
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
        kill_session(proc)
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


# ---- the submission window ---------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this module's own, in-process, as `cluster.connect` starts the embedded one:
    never another cluster on this machine (no RAY_ADDRESS, address="local"), with token auth
    on a token of its own (in the environment: Ray would otherwise write ~/.ray/auth_token).
    The environment is restored afterwards."""
    names = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    reset_auth_token_state()  # Ray read the mode when imported: read it again
    temp = tempfile.mkdtemp(prefix="ppw-", dir="/tmp")  # short: Ray's socket paths live in it
    try:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(saved)
        reset_auth_token_state()


def _refs_held() -> int:
    """Objects the driver's core worker holds references to (Ray's own reference table)."""
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


class Counted:
    """A real remote function whose submissions the driver records before Ray gets them:
    `.options(...).remote(...)` is Ray's own, and returns Ray's own ObjectRef."""

    def __init__(self, watch, kind, fn):
        self.watch, self.kind, self.fn = watch, kind, fn

    def options(self, **opts):
        fn, watch, kind = self.fn.options(**opts), self.watch, self.kind

        class Submit:
            def remote(self, *args, **kwargs):
                watch.submitted(kind, args)
                return fn.remote(*args, **kwargs)

        return Submit()


class Watch:
    """Driver-side bookkeeping: a combination is in flight from its prune submission until
    its row is in the table (a fine-tune coordinator in flight is one more row to come)."""

    def __init__(self, table):
        self.table = table
        self.calls: dict[str, list] = {}
        self.max_in_flight = self.max_train = self.max_refs = 0

    def submitted(self, kind, args):
        self.calls.setdefault(kind, []).append(args[0])  # the cfg: holding the refs would count them
        rows = len(self.table)
        if kind == "prune":
            self.max_in_flight = max(self.max_in_flight, len(self.calls["prune"]) - rows)
        if kind == "finetune" and args[0].finetune.num_workers:  # a Ray Train run
            self.max_train = max(self.max_train, len(self.calls["finetune"]) - rows)
        self.max_refs = max(self.max_refs, _refs_held())

    def cfgs(self, kind):
        return self.calls.get(kind, [])


def _spec(tmp_path, seeds: int, num_workers: int = 0, methods=("group_norm",)):
    return load_spec_dict({
        "name": "window", "dataset": {"name": "synthetic", "num_classes": 2, "synthetic_samples": 16},
        "models": ["resnet20"], "speedups": [1.5, 2.0], "methods": list(methods),
        "seeds": list(range(seeds)),
        "finetune": {"epochs": 1, "num_workers": num_workers, "use_gpu": False},
        "resources": {"gpus_per_task": 0, "cpus_per_task": 1, "max_concurrent": 2},
        "output": str(tmp_path / "out")})


def _run(monkeypatch, spec, window, fail=()):
    """`cluster.execute` on the real plan, table, lease and progress of `spec`'s output, with
    trivial stage tasks; they check that each gets its own upstream's value."""
    fails = frozenset(fail)

    # defined here, so that Ray pickles them by value (workers cannot import this file)
    @ray.remote
    def base(cfg, uri, retrain=False):
        return ("base", cfg.base_key())

    @ray.remote
    def sparse(cfg, uri, base, retrain=False):
        assert base == ("base", cfg.base_key()) and retrain
        return base

    @ray.remote
    def prune(cfg, uri, base):
        assert base == ("base", cfg.base_key()), base
        return ("pruned", cfg.combo_id())

    @ray.remote(num_cpus=0)
    def finetune(cfg, uri, pruned, resources):
        assert pruned == ("pruned", cfg.combo_id()), pruned
        if cfg.combo_id() in fails:
            raise RuntimeError("injected failure")
        assert resources.cpus_per_task == 1  # the typed settings, as the driver passes them
        if cfg.finetune.num_workers:
            time.sleep(0.05)  # a "Train run" lasts long enough for the next to start beside it
        return ResultRow(combo_id=cfg.combo_id(), sweep=cfg.sweep, model=cfg.model, dataset=cfg.dataset.name,
                         method=cfg.method, seed=cfg.seed, target_speedup=float(cfg.target_speedup),
                         achieved_speedup=float(cfg.target_speedup), latency_speedup=1.0,
                         status="ok", finetune_workers=cfg.finetune.num_workers)

    store = Store(spec.output)
    table = _table(store, spec.combinations())
    plan = make_plan(spec, store, statuses=table.statuses())
    watch = Watch(table)
    for name, kind, fn in (("base_task", "base", base), ("sparse_task", "sparse", sparse),
                           ("prune_task", "prune", prune), ("finetune_task", "finetune", finetune)):
        monkeypatch.setattr(tasks, name, Counted(watch, kind, fn))
    progress = _Progress(Console(file=io.StringIO(), highlight=False, markup=False), len(plan.todo))
    with store.lock(settle_s=0, on_wait=lambda s: None) as lease:
        failed = cluster.execute(plan, spec.resources.max_concurrent, progress, 2, table, lease, window=window)
    return watch, table, failed, store


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_sweep_larger_than_the_window_keeps_it_and_ends_with_one_row_each(local_ray, monkeypatch, tmp_path,
                                                                           num_workers):
    spec = _spec(tmp_path, seeds=12, num_workers=num_workers)  # 24 combinations, window 4
    combos = spec.combinations()
    watch, table, failed, _ = _run(monkeypatch, spec, window=4)
    assert failed == 0
    assert [r.combo_id for r in table.rows()] == [c.combo_id() for c in combos]  # one row each
    assert all(r.status == "ok" for r in table.rows())
    assert watch.cfgs("prune") == combos  # every combination once, in plan order
    assert sorted(c.combo_id() for c in watch.cfgs("finetune")) == sorted(c.combo_id() for c in combos)
    assert len(watch.cfgs("base")) == 12  # the bases still start all at once
    assert watch.max_in_flight == 4  # the window, filled and never exceeded
    # what the driver holds (Ray's own reference table): the window's refs, the last batch
    # taken (the loop's lists keep it until the next wait) and the bases not yet used up,
    # not one per combination (17-19 here; a window of 10**6 gives 25-35)
    assert watch.max_refs <= 2 * 4 + 12 + 2, watch.max_refs
    if num_workers:  # Ray Train runs in flight, capped apart from the window, and reached
        assert watch.max_train == spec.resources.max_concurrent


def test_without_a_window_argument_the_default_bounds_the_prunes_in_flight(local_ray, monkeypatch, tmp_path):
    """`window_size` reads WINDOW_MIN when called: set to 6 here (the real 64 would need a
    sweep of more than 64 combinations), so that 20 combinations overfill it."""
    monkeypatch.setattr(cluster, "WINDOW_MIN", 6)
    spec = _spec(tmp_path, seeds=10)  # 20 combinations > the default window, max(6, 4 x 2) = 8
    watch, table, failed, _ = _run(monkeypatch, spec, window=None)
    assert len(table) == 20 and failed == 0
    assert watch.max_in_flight == cluster.window_size(spec.resources.max_concurrent) == 8


def test_failures_and_sparse_models_through_the_window(local_ray, monkeypatch, tmp_path):
    spec = _spec(tmp_path, seeds=4, methods=["group_norm", "group_sl"])  # 16 combinations, window 3
    combos = spec.combinations()
    bad = combos[-1].combo_id()
    watch, table, failed, store = _run(monkeypatch, spec, window=3, fail=[bad])
    assert failed == 1
    # the driver writes the failed combination's fragment (the tasks here write none)
    assert store.list("rows") == [os.path.basename(row_parts(bad)[-1])]
    assert [r.combo_id for r in table.rows()] == [c.combo_id() for c in combos]
    (row,) = [r for r in table.rows() if r.combo_id == bad]
    assert row.status == "failed" and "injected failure" in row.error
    assert len(watch.cfgs("sparse")) == len({c.sparse_key() for c in combos if c.prune.method == "group_sl"})
    assert watch.cfgs("prune") == combos
    assert watch.max_in_flight == 3


def test_a_sweeps_exports_go_beside_the_stored_artifact(tmp_path):
    """`export: [onnx, torchscript]`: the fine-tune task writes each format beside the row's
    artifact through the Store (what s3/gs outputs go through too) and names them."""
    from progprune.artifacts import save_artifact
    from progprune.cluster.tasks import _export
    from progprune.export import read_metadata
    from progprune.models import build_model
    from progprune.spec import load_spec_dict
    from progprune.storage import LAYOUT, Store

    spec = load_spec_dict({"name": "x", "models": ["resnet20"], "speedups": [2], "export": ["onnx", "torchscript"],
                           "output": str(tmp_path / "out")})
    (cfg,) = spec.combinations()
    store = Store(spec.output)
    parts = LAYOUT.final(cfg)
    local = tmp_path / "final.pt"
    save_artifact(local, build_model("resnet20", 10), model_name="resnet20", num_classes=10,
                  meta={"combo_id": cfg.combo_id()})
    store.put_file(str(local), *parts)
    uris = _export(store, cfg, parts)
    names = ["final.onnx", "final.torchscript.pt"]
    assert uris == [store.display("combos", cfg.combo_id(), n) for n in names]
    assert sorted(store.list("combos", cfg.combo_id())) == sorted(["final.pt", *names])
    for n in names:
        assert read_metadata(store.path("combos", cfg.combo_id(), n))["progprune.combo_id"] == cfg.combo_id()
