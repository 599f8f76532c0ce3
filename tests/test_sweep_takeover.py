"""A retried driver on another machine resumes the sweep (issue 13 section 1).

A RayJob retry runs the driver on a new head pod: a new hostname, and the old driver's pid
means nothing there. Here each `progprune sweep` runs in its own UTS namespace (`unshare
--uts`, its own hostname) against one real local Ray cluster: the first is SIGKILLed mid-run
(its lock stays behind, its heartbeat stops); the rerun from another hostname waits at most
one lease, takes the lock over, runs only the missing combinations, and the output ends with
exactly one row per combination. A live holder on another hostname is refused, and
`--break-lock` takes a lock whose holder looks alive.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from progprune.spec import load_spec
from progprune.storage import LOCK_NAME, Store
from helpers import ROOT, run_env, tiny_spec
from raycluster import BIN

pytestmark = pytest.mark.ray

LEASE_S = 10


def _unshare_prefix() -> list[str]:
    """`unshare --uts` as root; as another user, inside a user namespace of our own."""
    for prefix in (["unshare", "--uts"], ["unshare", "--user", "--map-root-user", "--uts"]):
        r = subprocess.run([*prefix, "sh", "-c", "hostname pp-probe && hostname"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == "pp-probe":
            return prefix
    pytest.fail("this test needs `unshare --uts` (root, or unprivileged user namespaces): "
                "it is how it runs drivers with different hostnames on one machine")


def _sweep(hostname: str, *args, **popen) -> subprocess.Popen:
    """`progprune sweep ARGS` as a process whose hostname is `hostname`, in its own session
    (killing its process group touches nothing else). unshare and sh exec: its pid is the driver's."""
    cmd = [*_unshare_prefix(), "sh", "-c", 'hostname "$0" && exec "$@"', hostname,
           str(BIN / "progprune"), "sweep", *map(str, args)]
    env = run_env(PROGPRUNE_LOCK_LEASE_S=str(LEASE_S))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)


def _wait_for(cond, proc: subprocess.Popen, deadline: float, what: str) -> None:
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the first sweep exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def _ids(spec: Path) -> list[str]:
    return sorted(c.combo_id() for c in load_spec(spec).combinations())


def _rows(out: Path) -> dict:
    """combo_id -> (fragment mtime_ns, finished_at) of every row fragment."""
    got = {}
    for p in (out / "rows").glob("*.parquet"):
        (rec,) = pq.read_table(p, columns=["combo_id", "finished_at"]).to_pylist()
        got[rec["combo_id"]] = (p.stat().st_mtime_ns, rec["finished_at"])
    return got


@pytest.fixture(scope="module")
def takeover(tmp_path_factory, cluster):
    """Run the scenario once, on the session's cluster; the tests below check what it left."""
    tmp = tmp_path_factory.mktemp("takeover")
    # the live-holder probe below runs while the first sweep trains its base and prunes: a base
    # of several epochs and five combinations one at a time leave the first sweep unfinished
    # when it is killed, even on a loaded machine
    spec = tiny_spec(tmp, models=["resnet20"], speedups=[1.5, 2.0, 2.5, 3.0, 3.5], resources={"max_concurrent": 1},
                     base_training={"epochs": 8, "batch_size": 32, "augment": False})
    out = tmp / "out"
    first = _sweep("pp-first", spec, "--address", cluster.address)
    try:
        deadline = time.monotonic() + 600
        _wait_for((out / LOCK_NAME).exists, first, deadline, "its lock")
        lock = json.loads((out / LOCK_NAME).read_text())
        # a live holder on another host: refused, in about one heartbeat, on one line
        t0 = time.monotonic()
        live = _sweep("pp-third", spec, "--address", cluster.address)
        live_out, live_err = live.communicate(timeout=300)
        live_s = time.monotonic() - t0
        _wait_for(lambda: any((out / "rows").glob("*.parquet")), first, deadline, "its first row")
    finally:
        _kill_group(first)
    left = json.loads((out / LOCK_NAME).read_text())  # the killed driver's lease
    time.sleep(2)  # let anything the dead driver's tasks were writing land before we look
    kept = _rows(out)
    if len(kept) == len(_ids(spec)):
        pytest.fail("the first sweep finished every combination before it could be killed: "
                    "nothing is left for the rerun to take over (the live-holder probe ran too long)")
    t0 = time.monotonic()
    rerun = _sweep("pp-second", spec, "--address", cluster.address)
    stdout, stderr = rerun.communicate(timeout=900)
    rerun_s = time.monotonic() - t0
    return dict(spec=spec, out=out, lock=lock, left=left, live=(live.returncode, live_out, live_err, live_s),
                kept=kept, rerun=(rerun.returncode, stdout, stderr, rerun_s), first_pid=first.pid)


def test_live_holder_on_another_host_is_refused(takeover):
    rc, _, err, seconds = takeover["live"]
    assert takeover["lock"]["host"] == "pp-first" and takeover["lock"]["pid"] == takeover["first_pid"]
    assert rc == 2, err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: output") and "in use by another sweep" in err
    assert f"host pp-first pid {takeover['first_pid']}" in err and "--break-lock" in err
    assert seconds < 120, seconds  # preflight plus one heartbeat (2.5 s), not a lease or more
    print(f"live holder on another host refused after {seconds:.1f}s (CLI start and preflight included)")


def test_rerun_on_another_host_takes_over_within_one_lease_and_runs_only_the_missing(takeover):
    rc, stdout, stderr, seconds = takeover["rerun"]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    text = _flat(stdout)
    assert takeover["left"]["host"] == "pp-first"
    m = re.search(r"took over the lock of host pp-first pid (\d+) on \S+ \(no heartbeat for (\d+)s, lease (\d+)s\)",
                  text)
    assert m, text[-3000:]
    assert int(m.group(1)) == takeover["first_pid"] and int(m.group(3)) == LEASE_S
    assert int(m.group(2)) <= LEASE_S  # waited at most one lease
    print(f"rerun: {m.group(0)}; whole rerun {seconds:.0f}s")
    waited = re.search(r"waiting up to (\d+)s for a heartbeat", text)
    assert waited and int(waited.group(1)) <= LEASE_S, text[-3000:]

    spec, out, kept = takeover["spec"], takeover["out"], takeover["kept"]
    total = len(_ids(spec))
    assert 1 <= len(kept) < total
    to_run = int(re.search(r"to run (\d+);", text).group(1))
    assert to_run <= total - len(kept)
    now = _rows(out)
    assert sorted(now) == _ids(spec)  # one fragment per combination
    assert {cid: now[cid] for cid in kept} == kept  # finished rows were not rerun
    table = pq.read_table(out / "results.parquet").to_pandas()
    assert sorted(table.combo_id) == _ids(spec)  # exactly one row each, no duplicates
    assert (table.status == "ok").all(), table[["combo_id", "status", "error"]]
    assert not (out / LOCK_NAME).exists()


def test_break_lock_takes_a_live_lock(takeover):
    """A holder whose heartbeat is alive (a thread here, lease 10 min) and a human who knows
    it is gone: --break-lock takes the lock at once; the old holder learns it lost it."""
    spec, out = takeover["spec"], takeover["out"]
    held, release, box = threading.Event(), threading.Event(), {}

    def hold():
        with Store(str(out)).lock(lease_s=600, on_wait=lambda *_: None) as lease:
            box["lease"] = lease
            held.set()
            release.wait(300)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(30)
    try:
        before = _rows(out)
        r = _sweep("pp-fourth", spec, "--break-lock")  # nothing left to run: no Ray needed
        stdout, stderr = r.communicate(timeout=300)
        assert r.returncode == 0, stdout[-3000:] + stderr[-3000:]
        text = _flat(stdout)
        assert f"breaking the lock of host {os.uname().nodename} pid {os.getpid()}" in text, text[-2000:]
        assert re.search(r"to run 0;", text)
        assert _rows(out) == before
        deadline = time.monotonic() + 10
        while not box["lease"].lost and time.monotonic() < deadline:
            time.sleep(0.1)
        assert box["lease"].lost
    finally:
        release.set()
        t.join(30)
