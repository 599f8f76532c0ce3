"""The output store: the lease lock, file modes, streamed copies and the incremental
results table. Real files, real pyarrow file systems, real processes; no Ray.

`object_store(...)` is a Store that takes the object-store code path (pyarrow.fs calls
only: no rename, no O_EXCL, PUT/GET/DELETE semantics) over pyarrow's real LocalFileSystem,
the same FileSystem interface S3FileSystem and GcsFileSystem implement."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from progprune._atomic import atomic_path
from progprune.errors import BadInput, ProgpruneError
from progprune.results import ResultRow, read_rows, write_rows
from progprune.storage import LAYOUT, LOCK_NAME, Store, heartbeat_interval
from progprune.table import ResultsTable

ROOT = Path(__file__).resolve().parents[1]


def object_store(path: Path) -> Store:
    s = Store(str(path))
    s.local, s.uri = False, "file://" + s.root
    return s


STORES = {"local": lambda p: Store(str(p)), "object": object_store}


def lock_kw(kind: str) -> dict:
    return {"settle_s": 0.2} if kind == "object" else {}


def read_lock(store: Store) -> dict:
    # a LocalFileSystem output stream (the object-store path here) truncates, then writes:
    # unlike an S3 PUT a reader can catch it half done, so read until it parses
    for _ in range(100):
        try:
            return json.loads(Path(store.root, LOCK_NAME).read_text())
        except ValueError:
            time.sleep(0.01)
    raise AssertionError("the lock record never parsed")


def foreign_lock(store: Store, lease_s: float, heartbeat_age: float, host="another-host") -> None:
    """A lock record as a driver on another machine leaves it when it dies."""
    hb = time.time() - heartbeat_age
    rec = {"holder": f"host {host} pid 4242", "host": host, "pid": 4242, "token": "feedfacefeedface",
           "boot_id": "x", "pidns": "y", "acquired_at": "then", "heartbeat_at": hb,
           "expires_at": hb + lease_s, "lease_s": lease_s, "seq": 7}
    os.makedirs(store.root, exist_ok=True)
    Path(store.root, LOCK_NAME).write_text(json.dumps(rec))


class Holder(threading.Thread):
    """Holds a store's lock in a thread until told to release it."""

    def __init__(self, store, **kw):
        super().__init__(daemon=True)
        self.store, self.kw = store, kw
        self.held, self.release = threading.Event(), threading.Event()
        self.lease = None
        self.error = None

    def run(self):
        try:
            with self.store.lock(on_wait=lambda *_: None, **self.kw) as lease:
                self.lease = lease
                self.held.set()
                self.release.wait(60)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.held.set()

    def __enter__(self):
        self.start()
        assert self.held.wait(30) and self.error is None, self.error
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.join(30)


# ---- the lease lock ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", STORES)
def test_live_holder_makes_a_second_lock_refuse_in_seconds(tmp_path, kind):
    store = STORES[kind](tmp_path / "out")
    with Holder(store, lease_s=60, **lock_kw(kind)):
        lines = []
        t0 = time.monotonic()
        with pytest.raises(ProgpruneError) as e:
            with store.lock(lease_s=60, on_wait=lines.append, **lock_kw(kind)):
                pytest.fail("took a lock whose holder is alive")
        took = time.monotonic() - t0
    msg = str(e.value)
    assert "in use by another sweep" in msg and f"pid {os.getpid()}" in msg and "--break-lock" in msg
    assert "\n" not in msg
    # a live holder refreshes every heartbeat_interval (5 s for a 60 s lease): seen well before the lease
    assert took < heartbeat_interval(60) + 3, took
    assert len(lines) == 1 and "waiting up to" in lines[0]
    assert not Path(store.root, LOCK_NAME).exists()  # the holder released it


@pytest.mark.parametrize("kind", STORES)
def test_stale_lock_from_another_host_is_taken_over_within_one_lease(tmp_path, kind):
    store = STORES[kind](tmp_path / "out")
    lease = 4.0
    foreign_lock(store, lease, heartbeat_age=0.0)  # its driver died right after a heartbeat
    lines = []
    t0 = time.monotonic()
    with store.lock(lease_s=lease, on_wait=lines.append, **lock_kw(kind)) as mine:
        took = time.monotonic() - t0
        assert read_lock(store)["token"] == mine.token
    assert lease - 1 <= took <= lease + 1.5, took  # waited the lease out, not more
    assert "took over the lock of host another-host pid 4242" in lines[-1]
    assert not Path(store.root, LOCK_NAME).exists()


def test_lock_older_than_its_lease_waits_only_two_heartbeats(tmp_path):
    store = Store(str(tmp_path / "out"))
    foreign_lock(store, 8.0, heartbeat_age=300)  # dead for minutes
    t0 = time.monotonic()
    with store.lock(lease_s=8.0, on_wait=lambda *_: None):
        took = time.monotonic() - t0
    beat = heartbeat_interval(8.0)
    assert 2 * beat <= took <= 2 * beat + 1.5 < 8.0, took  # not the full lease


@pytest.mark.parametrize("kind", STORES)
def test_heartbeat_keeps_the_lock_past_its_lease(tmp_path, kind):
    store = STORES[kind](tmp_path / "out")
    lease = 1.0
    with Holder(store, lease_s=lease, **lock_kw(kind)) as h:
        first = read_lock(store)
        time.sleep(3 * lease)  # three leases: without heartbeats it would be stale
        with pytest.raises(ProgpruneError, match="in use by another sweep"):
            with store.lock(lease_s=lease, on_wait=lambda *_: None, **lock_kw(kind)):
                pass
        now = read_lock(store)
        assert now["token"] == first["token"] and now["seq"] > first["seq"] + 3
        assert now["heartbeat_at"] > first["heartbeat_at"] + 2 * lease
        assert not h.lease.lost
    assert not Path(store.root, LOCK_NAME).exists()


@pytest.mark.parametrize("kind", STORES)
def test_break_lock_takes_a_live_lock_and_the_old_holder_learns_it_lost(tmp_path, kind):
    store = STORES[kind](tmp_path / "out")
    with Holder(store, lease_s=2.0, **lock_kw(kind)) as old:
        lines = []
        t0 = time.monotonic()
        with store.lock(lease_s=2.0, break_lock=True, on_wait=lines.append, **lock_kw(kind)) as new:
            assert time.monotonic() - t0 < 2.0  # no waiting for the lease
            assert "breaking the lock of" in lines[0] and f"pid {os.getpid()}" in lines[0]
            deadline = time.monotonic() + 5
            while not old.lease.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            assert old.lease.lost
            with pytest.raises(ProgpruneError, match="lost its lock"):
                old.lease.check()
            old.release.set()
            old.join(10)
            assert read_lock(store)["token"] == new.token  # the old holder left it alone
            new.check()
    assert not Path(store.root, LOCK_NAME).exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from progprune.storage import Store\n"
            f"with Store({str(out)!r}).lock(lease_s=600): print('held', flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    assert (out / LOCK_NAME).exists()
    lines = []
    t0 = time.monotonic()
    with Store(str(out)).lock(lease_s=600, on_wait=lines.append):
        assert time.monotonic() - t0 < 2
    assert f"its process {p.pid} on this host is gone" in lines[-1]


def test_old_format_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(f"{socket.gethostname()} {p.stdout.strip()} 2025-01-01T00:00:00")
    t0 = time.monotonic()
    with Store(str(out)).lock(lease_s=600, on_wait=lambda *_: None):
        assert time.monotonic() - t0 < 2


def test_wait_false_refuses_a_fresh_lock_at_once_and_takes_an_expired_one(tmp_path):
    store = Store(str(tmp_path / "out"))
    foreign_lock(store, 30.0, heartbeat_age=1)
    t0 = time.monotonic()
    with pytest.raises(ProgpruneError, match=r"another-host pid 4242, last heartbeat 1s ago"):
        with store.lock(wait=False, on_wait=lambda *_: None):
            pass
    assert time.monotonic() - t0 < 1
    foreign_lock(store, 30.0, heartbeat_age=31)
    with store.lock(wait=False, on_wait=lambda *_: None):
        assert time.monotonic() - t0 < 2


def test_lease_length_from_the_environment(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "out"))
    monkeypatch.setenv("PROGPRUNE_LOCK_LEASE_S", "7.5")
    with store.lock(on_wait=lambda *_: None) as lease:
        assert lease.lease_s == 7.5 and read_lock(store)["lease_s"] == 7.5
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv("PROGPRUNE_LOCK_LEASE_S", bad)
        with pytest.raises(ProgpruneError, match="PROGPRUNE_LOCK_LEASE_S: expected a number of seconds"):
            with store.lock():
                pass
        assert not Path(store.root, LOCK_NAME).exists()


CONTENDER = """
import sys, time
sys.path.insert(0, {root!r})
from progprune.errors import BadInput, ProgpruneError
from progprune.storage import Store
kind, out, go = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = Store(out)
if kind == "object":
    store.local, store.uri = False, "file://" + store.root
time.sleep(max(0.0, go - time.time()))
try:
    with store.lock(lease_s=1.0, on_wait=lambda *_: None, settle_s=0.3):
        print("won", time.time(), flush=True)
        time.sleep(3.0)
        print("released", time.time(), flush=True)
except ProgpruneError as e:
    print("refused", time.time(), e, flush=True)
"""


@pytest.mark.parametrize("kind", STORES)
def test_contenders_for_a_stale_lock_one_wins(tmp_path, kind):
    """Four processes find the same stale lock at the same moment: exactly one takes it over;
    the others see its heartbeat and refuse while it holds the lock."""
    out = tmp_path / "out"
    store = STORES[kind](out)
    foreign_lock(store, 1.0, heartbeat_age=0.0)
    go = time.time() + 4  # after every interpreter has started
    code = CONTENDER.format(root=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, kind, str(out), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=60) for p in procs]
    firsts = [o.split()[0] if o.strip() else f"nothing: {e[-500:]}" for o, e in results]
    assert sorted(firsts) == ["refused"] * 3 + ["won"], results
    won = next(o for o, _ in results if o.startswith("won")).split()
    t_won, t_released = float(won[1]), float(won[3])
    for o, _ in results:
        if o.startswith("refused"):
            # refused while it was held: from its claim, which lands before its body prints "won" (on a
            # loaded machine a contender can see it first), on an object store `settle` before that
            assert t_won - (1.0 if kind == "object" else 0.25) <= float(o.split()[1]) <= t_released, (won, o)
            assert "in use by another sweep" in o
    assert not (out / LOCK_NAME).exists()


# ---- file modes follow the umask ------------------------------------------------------
def _row(cid: str, **kw) -> ResultRow:
    base = dict(combo_id=cid, sweep="t", model="resnet20", dataset="synthetic", method="l1", seed=0,
                target_speedup=2.0, achieved_speedup=2.01, status="ok", final_top1=0.5)
    return ResultRow(**{**base, **kw})


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store = Store(str(tmp_path / "out"))
        src = tmp_path / "src.bin"
        src.write_bytes(b"x" * 1000)
        os.chmod(src, 0o600)  # the copy must not inherit the source's mode
        written = [
            store.write_bytes(b"data", "spec.resolved.yaml"),
            store.put_file(str(src), "combos", "c1", "final.pt"),
            write_rows([_row("c1")], tmp_path / "out" / "rows" / "c1.parquet"),
        ]
        with atomic_path(tmp_path / "out" / "bases" / "b.pt", ".pt") as tmp:
            Path(tmp).write_bytes(b"weights")
        written.append(str(tmp_path / "out" / "bases" / "b.pt"))
        t = ResultsTable(store, ["c1"], min_interval_s=0)
        t.load()
        t.flush(force=True)
        written.append(store.path("results.parquet"))
    finally:
        os.umask(old)
    for p in written:
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, (p, oct(os.stat(p).st_mode))
    assert not [p for p in (tmp_path / "out").rglob(".tmp-*")]  # no temp file left


# ---- streamed copies ----------------------------------------------------------------------
STREAM = """
import hashlib, os, resource, sys, tracemalloc
sys.path.insert(0, {root!r})
from progprune.storage import Store
kind, src, out = sys.argv[1:4]
store = Store(out)
if kind == "object":
    store.local, store.uri = False, "file://" + store.root
def digest(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
store.put_file(src, "warm", "up.bin")  # first-call imports and pools
with store.local_copy("warm", "up.bin") as p:
    pass
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
store.put_file(src, "combos", "c", "final.pt")
with store.local_copy("combos", "c", "final.pt") as p:
    copied = digest(p)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak, (rss1 - rss0) * 1024, digest(store.path("combos", "c", "final.pt")), copied)
"""


@pytest.mark.parametrize("kind", STORES)
def test_put_file_and_local_copy_stream(tmp_path, kind):
    size = 96 << 20
    src = tmp_path / "big.bin"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    r = subprocess.run([sys.executable, "-c", STREAM.format(root=str(ROOT)), kind, str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    peak, rss_growth, stored, copied = r.stdout.split()
    assert stored == copied == h.hexdigest()
    # a whole-file read would be >= 96 MiB of Python bytes and of resident memory
    assert int(peak) < 4 << 20, f"python allocations peaked at {int(peak) / 2**20:.1f} MiB"
    assert int(rss_growth) < 24 << 20, f"resident memory grew {int(rss_growth) / 2**20:.1f} MiB"


# ---- the results table -------------------------------------------------------------------
def _fragment(store: Store, row: ResultRow) -> None:
    """What cluster.write_fragment does: a local Parquet file put into the store."""
    p = Path(store.root).parent / f"frag-{row.combo_id}.parquet"
    write_rows([row], p)
    store.put_file(str(p), *LAYOUT.row(row.combo_id))
    p.unlink()


@pytest.mark.parametrize("kind", STORES)
def test_results_table_loads_once_adds_and_writes_one_row_per_combination(tmp_path, kind):
    store = STORES[kind](tmp_path / "out")
    ids = [f"c{i}" for i in range(6)]
    for cid in ids[:3]:
        _fragment(store, _row(cid, final_top1=0.1))
    _fragment(store, _row("other-spec"))  # another spec's row in the same output: not ours
    Path(store.root, "rows", "c3.parquet").write_bytes(b"PAR1 torn write")  # unreadable: rerun it
    # a fragment from an older progprune without the newer columns
    pq.write_table(pa.table({"combo_id": ["c4"], "sweep": ["t"], "model": ["vgg11"], "dataset": ["synthetic"],
                             "method": ["l1"], "seed": [0], "target_speedup": [2.0], "status": ["failed"]}),
                   os.path.join(store.root, "rows", "c4.parquet"))

    t = ResultsTable(store, ids, min_interval_s=3600)
    loaded = t.load()
    assert [r.combo_id for r in loaded] == ["c0", "c1", "c2", "c4"]
    assert t.unreadable == ["c3"]
    assert t.statuses() == {"c0": "ok", "c1": "ok", "c2": "ok", "c4": "failed"}
    assert loaded[-1].model == "vgg11" and loaded[-1].final_top1 is None

    t.flush()  # nothing written yet: the first flush writes (the table may lag its fragments)
    assert t.writes == 1
    for cid in ("c3", "c4", "c5"):
        row = _row(cid, final_top1=0.9)
        _fragment(store, row)
        t.add(row)
        t.flush()  # within the interval: no rewrite
    assert t.writes == 1
    with pytest.raises(ValueError):
        t.add(_row("not-in-this-sweep"))
    rows = t.flush(force=True)
    assert t.writes == 2
    t.flush(force=True)  # nothing changed since: no rewrite
    assert t.writes == 2

    with store.local_copy("results.parquet") as p:
        back = read_rows(p)
    assert [r.combo_id for r in back] == ids == [r.combo_id for r in rows]
    assert {r.combo_id: r.final_top1 for r in back} == {"c0": 0.1, "c1": 0.1, "c2": 0.1,
                                                        "c3": 0.9, "c4": 0.9, "c5": 0.9}
    # a fresh table (a rerun) reads the same from the fragments, each once
    again = ResultsTable(store, ids)
    assert [r.combo_id for r in again.load()] == ids and again.fragments_read == 6


def test_results_table_rewrites_at_a_bounded_rate(tmp_path):
    store = Store(str(tmp_path / "out"))
    ids = [f"c{i:03d}" for i in range(200)]
    t = ResultsTable(store, ids, min_interval_s=0.25)
    t.load()
    assert t.fragments_read == 0
    t0 = time.monotonic()
    for i, cid in enumerate(ids):
        t.add(_row(cid))
        t.flush()
        if i % 20 == 0:
            time.sleep(0.1)
    elapsed = time.monotonic() - t0
    t.flush(force=True)
    assert t.writes <= 2 + elapsed / 0.25, (t.writes, elapsed)
    assert t.writes < 20  # one rewrite per row would be 200
    assert pq.read_table(store.path("results.parquet")).num_rows == 200
    assert pq.read_table(store.path("results.parquet")).column("combo_id").to_pylist() == ids


def test_results_interval_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PROGPRUNE_RESULTS_INTERVAL_S", "42")
    assert ResultsTable(Store(str(tmp_path)), ["a"]).min_interval_s == 42
    monkeypatch.setenv("PROGPRUNE_RESULTS_INTERVAL_S", "often")
    with pytest.raises(ProgpruneError, match="PROGPRUNE_RESULTS_INTERVAL_S"):
        ResultsTable(Store(str(tmp_path)), ["a"])


# ---- the layout ---------------------------------------------------------------------------
def test_layout_is_the_format_earlier_outputs_were_written_in():
    """An output written before the layout object existed resumes: every name stays where
    progprune always put it (the f-strings below are the ones the old code spelled)."""
    from progprune.spec import load_spec_dict

    spec = load_spec_dict({"name": "t", "models": ["resnet20"], "speedups": [2], "seeds": [3],
                           "methods": ["group_sl"]}, check_paths=False)
    (cfg,) = spec.combinations()
    cid = cfg.combo_id()
    assert LAYOUT.base(cfg) == ("bases", f"resnet20-s3-{cfg.base_key()}.pt")
    assert LAYOUT.sparse(cfg) == ("sparse", f"resnet20-group_sl-s3-{cfg.sparse_key()}.pt")
    assert LAYOUT.row(cid) == ("rows", f"{cid}.parquet")
    assert LAYOUT.pruned(cfg) == ("combos", cid, "pruned.pt") and LAYOUT.final(cfg) == ("combos", cid, "final.pt")
    assert LAYOUT.train_run(cid) == ("train", f"ft-{cid}")
    assert (LAYOUT.results, LAYOUT.spec, LAYOUT.report, LAYOUT.rows, LAYOUT.train, LAYOUT.lock) == (
        ("results.parquet",), ("spec.resolved.yaml",), ("report",), ("rows",), ("train",), (".lock",))
    assert LOCK_NAME == ".lock"


# ---- opening a store ----------------------------------------------------------------------
class _FailsWithoutAMessage:
    """pyarrow.fs.FileSystem as it behaves when a C++ Status carries no message."""

    @staticmethod
    def from_uri(uri):
        raise OSError()


def test_a_uri_that_fails_without_a_message_is_one_line(monkeypatch):
    """Was an IndexError (the first line of an empty message) instead of the bad-input line."""
    import pyarrow.fs as pafs

    monkeypatch.setattr(pafs, "FileSystem", _FailsWithoutAMessage)
    with pytest.raises(BadInput) as e:
        Store("s3://KEY:SECRET@bucket/out")
    assert str(e.value) == "output: cannot open s3://***@bucket/out: OSError"


def test_a_bad_uri_names_the_store_and_hides_credentials():
    with pytest.raises(BadInput) as e:
        Store("s3://KEY:SECRET@bucket/out?no_such_option=1", label="results")
    text = str(e.value)
    assert text.startswith("results: cannot open s3://***@bucket/out") and "SECRET" not in text
    assert "no_such_option" in text and "\n" not in text


# ---- secure defaults ------------------------------------------------------------------
def test_store_never_shows_uri_credentials():
    secret = "S3CR3T" + secrets.token_hex(8)
    s = Store(f"s3://AKIAKEY:{secret}@bucket/runs?region=us-east-1&endpoint_override=127.0.0.1:9")
    for text in (repr(s), s.display(), s.display("results.parquet")):
        assert secret not in text and "AKIAKEY" not in text, text
        assert "bucket" in text


# ---- issue 23: bounded leases, a lock of the wrong kind, remote stores that do not answer ----
def test_lease_above_the_maximum_is_refused_from_the_environment_and_cut_in_a_record(tmp_path, monkeypatch):
    """A record asking for a 10^9 s lease made the next sweep wait "up to 1000000000s", and
    $PROGPRUNE_LOCK_LEASE_S had no upper bound (item 12)."""
    from progprune.storage import MAX_LEASE_S

    store = Store(str(tmp_path / "out"))
    monkeypatch.setenv("PROGPRUNE_LOCK_LEASE_S", "1000000000")
    with pytest.raises(BadInput, match=r"^PROGPRUNE_LOCK_LEASE_S: expected a number of seconds > 0 and <= 600, "
                                        r"got '1000000000'$"):
        with store.lock():
            pass
    monkeypatch.delenv("PROGPRUNE_LOCK_LEASE_S")
    with pytest.raises(BadInput, match=r"lock lease: expected seconds > 0 and <= 600"):
        with store.lock(lease_s=1e9):
            pass
    assert not Path(store.root, LOCK_NAME).exists()
    # a record's lease counts as the maximum: silent for longer than that, it is stale
    foreign_lock(store, 1e9, heartbeat_age=MAX_LEASE_S + 100)
    lines = []
    with store.lock(wait=False, on_wait=lines.append):
        pass
    assert lines == [f"lock: took over the lock of host another-host pid 4242 on {store.display()} (no heartbeat "
                     f"for 700s, lease 600s; its record asks for 1000000000s, more than the 600s maximum)"]
    # watched, it is waited for until the maximum runs out, not the record's lease
    foreign_lock(store, 1e9, heartbeat_age=MAX_LEASE_S - 1)
    lines, taken = [], threading.Event()

    def take():
        with store.lock(on_wait=lines.append):
            taken.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(120)  # a guard: unfixed, this waited 10^9 s
    assert taken.is_set(), lines
    assert lines[0].endswith("waiting up to 11s for a heartbeat (lease 600s; its record asks for 1000000000s, "
                             "more than the 600s maximum)"), lines[0]
    assert "took over the lock of host another-host pid 4242" in lines[-1]


@pytest.mark.parametrize("kind", STORES)
def test_a_lock_that_is_a_directory_is_one_line(tmp_path, kind):
    """Was IsADirectoryError from deep in the lock code (item 16)."""
    store = STORES[kind](tmp_path / "out")
    (tmp_path / "out" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(BadInput) as e:
        with store.lock(on_wait=lambda *_: None, **lock_kw(kind)):
            pytest.fail("took a lock that is a directory")
    assert str(e.value) == (f"output: {store.display(LOCK_NAME)} is a directory, where this output keeps its file "
                            f"{LOCK_NAME}; move it away or choose another --output")
    assert (tmp_path / "out" / LOCK_NAME).is_dir() and not any((tmp_path / "out" / LOCK_NAME).iterdir())


def _one_line_run(*args, env, timeout=240) -> str:
    """A real `progprune` process that must end by itself (exit 2) with one line on stderr."""
    from helpers import progprune

    r = progprune(*args, env=env, timeout=timeout)  # a guard: unfixed, gs:// hung for more than 5 minutes
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stdout == ""
    return r.stderr


@pytest.mark.timeout(600)
def test_a_bucket_that_cannot_be_reached_is_one_line(tmp_path):
    """gs:// without credentials or network (as here): `sweep` and `report` hung for more
    than 5 minutes, deaf to Ctrl-C (item 10). The first call to a remote store is a probe
    that gives up, naming the scheme and why."""
    from helpers import run_env, tiny_spec

    env = run_env()
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    uri = "gs://progprune-no-such-bucket/runs/x"
    hint = "GCS needs credentials (GOOGLE_APPLICATION_CREDENTIALS"
    err = _one_line_run("sweep", tiny_spec(tmp_path), "--dry-run", "--output", uri, env=env)
    assert err.startswith(f"error: output: cannot reach {uri} (gs://): ") and hint in err, err
    err = _one_line_run("report", uri, env=env)
    assert err.startswith(f"error: results: cannot reach {uri} (gs://): ") and hint in err, err


@pytest.mark.timeout(600)
def test_a_store_that_never_answers_is_given_up_after_the_deadline(tmp_path):
    """Whatever the client's own timeouts: an endpoint that takes the connection and never
    answers is given up after $PROGPRUNE_STORE_PROBE_S, and the process ends."""
    import socket

    from helpers import run_env

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the handshakes; nothing ever answers
        port = silent.getsockname()[1]
        uri = f"s3://bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        env = run_env(PROGPRUNE_STORE_PROBE_S="1", AWS_ACCESS_KEY_ID="AKIATEST", AWS_SECRET_ACCESS_KEY="secret",
                      AWS_EC2_METADATA_DISABLED="true")
        # the process ends with its line: it used to print it after 2 s and then wait 100 s
        # in Arrow's S3 finalizer for the abandoned request (a timeout here is a failure)
        err = _one_line_run("report", uri, env=env, timeout=60)
    assert err.startswith(f"error: results: cannot reach {uri} (s3://): no answer within 1s "
                          "(PROGPRUNE_STORE_PROBE_S); S3 needs credentials"), err


# ---- the local lock file's answers when another claimant got there between two steps --------
# (what a race between two sweeps leaves; arranged here on disk, so each answer is checked
# every run rather than only when the race happens to occur)
def test_local_lock_io_when_the_lock_vanished_or_changed_between_two_steps(tmp_path):
    import json

    from progprune.storage.lockio import LocalLockIO

    io = LocalLockIO(str(tmp_path / ".lock"))
    rec = lambda token: json.dumps({"token": token}).encode()  # noqa: E731
    assert io.read() is None  # nothing there: no record, no error
    assert io.take_over(rec("stale"), rec("mine")) is False  # it vanished: nothing taken
    io.remove(rec("mine"))  # removing what is not there is fine
    assert io.create(rec("other")) is True
    # another claimant replaced the record we judged stale: it is put back, we do not take it
    assert io.take_over(rec("stale"), rec("mine")) is False
    assert io.read() == rec("other")
    # someone else's lock is not ours to remove: it stays
    io.remove(rec("mine"))
    assert io.read() == rec("other")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing moved aside is left
    io.remove(rec("other"))
    assert io.read() is None and list(tmp_path.iterdir()) == []
