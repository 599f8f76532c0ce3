"""The sweep output: a local directory or an object-store URI, through pyarrow.fs.

Layout under the output root:
  results.parquet            merged table (rewritten atomically, at a bounded rate)
  rows/<combo_id>.parquet    one fragment per finished combination (the source of truth)
  bases/<base_key>.pt        base models, shared by every combination that needs them
  sparse/<sparse_key>.pt     sparse-learned models, shared per (model, method, seed)
  combos/<combo_id>/         pruned.pt, final.pt
  train/                     Ray Train run storage (checkpoints for fault tolerance)
  spec.resolved.yaml         the spec with every default filled
  report/                    report.md, plots
  .lock                      the lease of the sweep that owns this output (see Store.lock)
Every write is atomic: a local temp file renamed into place, or one object PUT (a multipart
upload appears whole). Files follow the umask. Copies stream in chunks, never a whole file
in memory.
"""
from __future__ import annotations

import json
import os
import posixpath
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager

import pyarrow.fs as pafs

from progprune._atomic import atomic_path, create_new, nearest_existing
from progprune.errors import BadInput

LOCK_NAME = ".lock"
LEASE_ENV = "PROGPRUNE_LOCK_LEASE_S"
DEFAULT_LEASE_S = 120.0
SETTLE_ENV = "PROGPRUNE_LOCK_SETTLE_S"
DEFAULT_SETTLE_S = 2.0
CHUNK = 1 << 20  # streamed copies move 1 MiB at a time


def base_parts(cfg) -> tuple:
    return ("bases", f"{cfg.model}-s{cfg.seed}-{cfg.base_key()}.pt")


def sparse_parts(cfg) -> tuple:
    return ("sparse", f"{cfg.model}-{cfg.method}-s{cfg.seed}-{cfg.sparse_key()}.pt")


def row_parts(combo_id: str) -> tuple:
    return ("rows", f"{combo_id}.parquet")


def _redact(uri: str) -> str:
    """Drop any credentials embedded in a URI (s3://KEY:SECRET@bucket)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def _env_seconds(name: str, default: float, allow_zero: bool = False) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v >= 0 if allow_zero else v > 0) or v == float("inf"):
        raise BadInput(f"{name}: expected a number of seconds {'>= 0' if allow_zero else '> 0'}, got {raw!r}")
    return v


def lease_seconds(lease_s: float | None = None) -> float:
    """The lock lease: the argument, else $PROGPRUNE_LOCK_LEASE_S, else 120 s."""
    if lease_s is not None:
        if not lease_s > 0:
            raise BadInput(f"lock lease: expected seconds > 0, got {lease_s}")
        return float(lease_s)
    return _env_seconds(LEASE_ENV, DEFAULT_LEASE_S)


def heartbeat_interval(lease_s: float) -> float:
    """How often a holder refreshes its lease: a quarter of it, at most 5 s (so a second
    sweep learns in seconds that the holder is alive), at least 0.2 s."""
    return max(0.2, min(lease_s / 4, 5.0))


class Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.local = "://" not in uri or uri.startswith("file://")
        if self.local:
            root = uri[len("file://"):] if uri.startswith("file://") else uri
            self.root = os.path.abspath(os.path.expanduser(root))
            self.uri = self.root  # tasks on other processes must not depend on our cwd
            self.fs = pafs.LocalFileSystem()
        else:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except Exception as e:  # pyarrow raises several types for bad URIs
                raise BadInput(f"output: cannot open {_redact(uri)}: {str(e).splitlines()[0]}") from None

    def __repr__(self) -> str:
        return f"Store({_redact(self.uri)})"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.local else os.path.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A location other tools (Ray Train's storage_path) can open."""
        return self.path(*parts) if self.local else self.uri.rstrip("/") + "/" + "/".join(parts)

    def display(self, *parts: str) -> str:
        return self.path(*parts) if self.local else _redact(self.uri.rstrip("/") + "/" + "/".join(parts))

    # ---- basic IO -------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> str:
        target = self.path(*parts)
        if self.local:
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                f.write(data)
        else:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            with self.fs.open_output_stream(target) as f:  # one PUT: atomic for readers
                f.write(data)
        return target

    def put_file(self, local_path: str, *parts: str) -> str:
        """Copy a local file into the store, streamed in chunks (constant memory)."""
        target = self.path(*parts)
        if self.local:
            with atomic_path(target) as tmp:
                shutil.copyfile(local_path, tmp)  # contents only: the mode follows the umask
        else:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            pafs.copy_files(os.path.abspath(local_path), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs, chunk_size=CHUNK, use_threads=False)
        return target

    @contextmanager
    def local_copy(self, *parts: str):
        """A local path holding the object (the file itself when the store is local);
        a remote object is streamed to a private temp dir, removed afterwards."""
        if self.local:
            yield self.path(*parts)
            return
        d = tempfile.mkdtemp(prefix="progprune-")
        try:
            p = os.path.join(d, os.path.basename(parts[-1]))
            pafs.copy_files(self.path(*parts), p, source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem(), chunk_size=CHUNK, use_threads=False)
            yield p
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def list(self, *parts: str) -> list[str]:
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File)

    def delete_tree(self, *parts: str) -> None:
        """Remove a directory (or prefix) and everything under it; absent is fine."""
        try:
            self.fs.delete_dir(self.path(*parts))
        except (FileNotFoundError, OSError):
            pass

    def delete(self, *parts: str) -> None:
        try:
            self.fs.delete_file(self.path(*parts))
        except (FileNotFoundError, OSError):
            pass

    # ---- checks and locking ---------------------------------------------------------
    def check_writable(self, probe_write: bool = True) -> None:
        """Fail in seconds, before any work, if the output cannot be written. Without
        `probe_write` (a dry run, which writes nothing): a local output is judged from the
        filesystem as it is; a bucket is not checked."""
        if not probe_write:
            if not self.local:
                return
            parent = nearest_existing(self.root)
            if not os.path.isdir(parent):
                why = f"{'it' if parent == self.root else parent} exists and is not a directory"
            elif not os.access(parent, os.W_OK | os.X_OK):
                why = f"no write permission on {parent}"
            else:
                return
            raise BadInput(f"output: cannot write to {self.display()}: {why}; "
                                 "choose a writable location with --output")
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(b"ok", probe)
            self.delete(probe)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BadInput(f"output: cannot write to {self.display()}: {first}; "
                                 "choose a writable location with --output") from None

    @contextmanager
    def lock(self, lease_s: float | None = None, break_lock: bool = False, wait: bool = True,
             on_wait=print, settle_s: float | None = None):
        """One sweep at a time per output, as a lease (yields the `Lease`).

        The holder refreshes a heartbeat in `<output>/.lock` every `heartbeat_interval`
        seconds from a daemon thread. A lock found on entry is:
        - taken over at once when its holder ran on this host (same hostname, boot and pid
          namespace) and that pid is dead;
        - otherwise watched (wait=True): if its heartbeat moves, the holder is alive and this
          call refuses (ProgpruneError, one line, naming the holder and --break-lock); if it
          does not move until its lease ends (at most one lease from now, measured on this
          machine's clock), the lock is taken over, with a line to `on_wait`;
        - with wait=False, taken over only when it is already older than its lease by the
          wall clock, else refused at once;
        - with break_lock=True, removed (whoever holds it) and then taken.
        `lease_s` defaults to $PROGPRUNE_LOCK_LEASE_S, else 120 s. On an object store every
        claim is written, left to settle for `settle_s` ($PROGPRUNE_LOCK_SETTLE_S, 2 s) and
        read back (see README: there is no conditional PUT, so this is best effort)."""
        lease_s = lease_seconds(lease_s)
        settle = _env_seconds(SETTLE_ENV, DEFAULT_SETTLE_S, allow_zero=True) if settle_s is None else settle_s
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            io = _LocalLockIO(self.path(LOCK_NAME))
        else:
            io = _ObjectLockIO(self.fs, self.path(LOCK_NAME), settle)
        lease = Lease(self, io, lease_s, on_wait)
        lease._acquire(break_lock=break_lock, wait=wait)
        try:
            yield lease
        finally:
            lease._release()


# ---- the lease ---------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _pid_dead(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def _parse(raw: bytes) -> dict:
    """A lock record; a lock written by an older progprune ("host pid time") or garbage
    becomes a record with just what can be read from it."""
    try:
        rec = json.loads(raw.decode())
        if isinstance(rec, dict) and "token" in rec:
            return rec
    except (ValueError, UnicodeDecodeError):
        pass
    text = raw.decode(errors="replace").strip()
    parts = text.split()
    return {"holder": text[:200] or "unknown holder", "host": parts[0] if parts else None,
            "pid": parts[1] if len(parts) > 1 else None, "legacy": True}


class Lease:
    """A held output lock. `lost` turns true when the heartbeat finds the lock no longer
    ours (taken over after we failed to refresh for a lease, or broken with --break-lock);
    `check()` raises then, so a driver can stop before writing more."""

    def __init__(self, store: Store, io, lease_s: float, on_wait):
        self.store, self.io, self.lease_s, self.on_wait = store, io, lease_s, on_wait or (lambda *_: None)
        self.interval = heartbeat_interval(lease_s)
        self.token = secrets.token_hex(8)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.holder = f"host {self.host} pid {self.pid}"
        self.acquired_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.seq = 0
        self.lost = False
        self.lost_to = None
        self.heartbeats = 0
        self._stop = threading.Event()
        self._thread = None
        self._io_lock = threading.Lock()

    # record ---------------------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        self.seq += 1
        return json.dumps({
            "holder": self.holder, "host": self.host, "pid": self.pid, "token": self.token,
            "boot_id": _boot_id(), "pidns": _pidns(), "acquired_at": self.acquired_at,
            "heartbeat_at": now, "expires_at": now + self.lease_s, "lease_s": self.lease_s,
            "seq": self.seq}).encode()

    def _same_host_dead(self, rec: dict) -> bool:
        if rec.get("host") != self.host or rec.get("pid") is None:
            return False
        if not rec.get("legacy") and (rec.get("boot_id") != _boot_id() or rec.get("pidns") != _pidns()):
            return False  # another container/pod with our hostname: its pids are not ours
        return _pid_dead(rec["pid"])

    def _refuse(self, rec: dict):
        age = _age(rec)
        when = f", last heartbeat {age:.0f}s ago" if age is not None else ""
        raise BadInput(
            f"output {self.store.display()} is in use by another sweep ({rec.get('holder', 'unknown holder')}"
            f"{when}); wait for it to finish, or rerun with --break-lock if that process is gone")

    # acquire ----------------------------------------------------------------------------
    def _acquire(self, break_lock: bool, wait: bool) -> None:
        for _ in range(20):  # each pass ends in a claim, a refusal, or a lost race (retried)
            if self.io.create(self._record()):
                return self._start()
            raw = self.io.read()
            if raw is None:
                continue  # released in the meantime
            rec = _parse(raw)
            if break_lock:
                self.on_wait(f"lock: breaking the lock of {rec.get('holder')} on {self.store.display()} "
                             "(--break-lock)")
                self.io.remove(None)
                break_lock = False
                continue
            if self._same_host_dead(rec):
                why = f"its process {rec.get('pid')} on this host is gone"
            elif not wait:
                age = _age(rec)
                if age is None or age <= _lease_of(rec, self.lease_s):
                    self._refuse(rec)
                why = f"no heartbeat for {age:.0f}s, lease {_lease_of(rec, self.lease_s):.0f}s"
            else:
                state, raw2, why = self._watch(raw, rec)
                if state == "gone":
                    continue
                if state == "alive":
                    self._refuse(_parse(raw2))
            if self.io.take_over(raw, self._record()):
                self.on_wait(f"lock: took over the lock of {rec.get('holder')} on {self.store.display()} ({why})")
                return self._start()
            # another sweep claimed it first: look again (its heartbeat makes us refuse)
        raise BadInput(f"output {self.store.display()}: could not take the lock (it keeps changing hands)")

    def _watch(self, raw: bytes, rec: dict):
        """Watch a lock until its heartbeat moves ('alive'), it disappears ('gone') or its
        lease runs out ('stale'). Waits at most the holder's lease, on our own clock: a
        holder refreshes every heartbeat_interval, so a live one moves well before that.
        When the record's own expiry (its clock) is nearer, wait only until then, but
        never less than two heartbeats, so a skewed clock cannot evict a live holder."""
        lease = _lease_of(rec, self.lease_s)
        beat = heartbeat_interval(lease)
        age = _age(rec)
        left = lease if age is None else lease - age
        wait_for = min(lease, max(2 * beat + 1.0, left))
        when = f"last heartbeat {age:.0f}s ago" if age is not None else "no heartbeat in it"
        self.on_wait(f"lock: {self.store.display()} is locked by {rec.get('holder')} ({when}); "
                     f"waiting up to {wait_for:.0f}s for a heartbeat (lease {lease:.0f}s)")
        t0 = time.monotonic()
        poll = min(1.0, beat / 2)
        while time.monotonic() - t0 < wait_for:
            time.sleep(min(poll, max(0.0, wait_for - (time.monotonic() - t0))))
            now = self.io.read()
            if now is None:
                return "gone", None, ""
            if now != raw:
                return "alive", now, ""
        return "stale", raw, f"no heartbeat for {time.monotonic() - t0:.0f}s, lease {lease:.0f}s"

    # heartbeat and release -----------------------------------------------------------------
    def _start(self) -> None:
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="progprune-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._io_lock:
                    raw = self.io.read()
                    rec = _parse(raw) if raw is not None else {}
                    if rec.get("token") != self.token:
                        self.lost, self.lost_to = True, rec.get("holder", "nobody (the lock was removed)")
                        self.on_wait(f"lock: warning: lost the lock on {self.store.display()} to {self.lost_to}")
                        return
                    self.io.replace(self._record())
                    self.heartbeats += 1
                    self._last_ok = time.monotonic()
            except Exception as e:  # a transient store error: try again next beat
                self.on_wait(f"lock: heartbeat failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")

    def check(self) -> None:
        if self.lost:
            raise BadInput(f"output {self.store.display()}: this sweep lost its lock to {self.lost_to}; "
                                 "stopping so that two sweeps do not write one output")

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        with self._io_lock:
            raw = self.io.read()
            if raw is not None and _parse(raw).get("token") == self.token:
                self.io.remove(raw)


def _lease_of(rec: dict, default: float) -> float:
    try:
        v = float(rec.get("lease_s"))
        return v if v > 0 else default
    except (TypeError, ValueError):
        return default


def _age(rec: dict) -> float | None:
    try:
        return max(0.0, time.time() - float(rec["heartbeat_at"]))
    except (KeyError, TypeError, ValueError):
        return None


class _LocalLockIO:
    """The lock on a POSIX file system (local disk, NFS/RWX volume). Every step is one
    atomic operation of the file system: link(2) to create (fails if the lock exists,
    and readers never see half a record), rename(2) to refresh and to move a stale lock
    aside, and the moved-aside record is compared with the one judged stale before the
    takeover goes on."""

    def __init__(self, path: str):
        self.path = path
        self.dir = os.path.dirname(path)

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _temp(self, data: bytes) -> str:
        tmp = create_new(self.dir, ".lock-tmp-")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> bool:
        tmp = self._temp(data)
        try:
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:
                # NFS: the LINK reply can be lost after the server did it; the link
                # count of our temp file says whether it happened
                return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)

    def replace(self, data: bytes) -> None:
        os.replace(self._temp(data), self.path)

    def _move_aside(self) -> str | None:
        aside = os.path.join(self.dir, f".lock-stale-{secrets.token_hex(6)}")
        try:
            os.rename(self.path, aside)
            return aside
        except FileNotFoundError:
            return None

    def take_over(self, stale: bytes, data: bytes) -> bool:
        aside = self._move_aside()
        if aside is None:
            return False
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != stale:
                # not the record we judged stale (someone took over or refreshed meanwhile):
                # put it back unless a newer lock is already there
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
        finally:
            os.unlink(aside)
        return self.create(data)

    def remove(self, expected: bytes | None) -> None:
        """Remove the lock if it still is `expected` (or carries its token); None: whatever it is."""
        aside = self._move_aside()
        if aside is None:
            return
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if expected is not None and moved != expected \
                    and _parse(moved).get("token") != _parse(expected).get("token"):
                try:
                    os.link(aside, self.path)  # not ours to remove: put it back
                except FileExistsError:
                    pass
        finally:
            os.unlink(aside)


class _ObjectLockIO:
    """The lock on an object store. pyarrow.fs has no conditional PUT, so a claim is: read
    (the lock must be absent, or still the record judged stale), PUT our record, wait
    `settle` seconds, read back: the claim holds only if our token is what is there. With
    read-after-write consistent stores (S3 since 2020, GCS) two claimants that both PUT
    within `settle` of each other both read the last writer's record, so only one wins;
    a claimant stalled longer than `settle` between its read and its PUT can still win
    twice, which the loser's next heartbeat detects (Lease.lost)."""

    def __init__(self, fs, path: str, settle: float):
        self.fs, self.path, self.settle = fs, path, settle

    def read(self) -> bytes | None:
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def _claim(self, data: bytes) -> bool:
        self.replace(data)
        time.sleep(self.settle)
        now = self.read()
        return now is not None and _parse(now).get("token") == _parse(data).get("token")

    def create(self, data: bytes) -> bool:
        if self.read() is not None:
            return False
        return self._claim(data)

    def take_over(self, stale: bytes, data: bytes) -> bool:
        if self.read() != stale:
            return False
        return self._claim(data)

    def remove(self, expected: bytes | None) -> None:
        now = self.read()
        if now is not None and (expected is None or now == expected
                                or _parse(now).get("token") == _parse(expected).get("token")):
            try:
                self.fs.delete_file(self.path)
            except (FileNotFoundError, OSError):
                pass
