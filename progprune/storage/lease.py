"""The lease that lets one sweep at a time write an output (`<output>/.lock`).

The holder refreshes a heartbeat in the lock record every `heartbeat_interval` seconds
from a daemon thread. A lock found on entry is:
- taken over at once when its holder ran on this host (same hostname, boot and pid
  namespace) and that pid is dead;
- otherwise watched (wait=True): if its heartbeat moves, the holder is alive and the claim
  is refused (BadInput, one line, naming the holder and --break-lock); if it does not move
  until its lease ends (at most one lease from now, measured on this machine's clock), the
  lock is taken over, with a line to `on_wait`;
- with wait=False, taken over only when it is already older than its lease by the wall
  clock, else refused at once;
- with break_lock=True, removed (whoever holds it) and then taken.
Where the record is kept, and how it is claimed atomically, is `lockio`'s part.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager

from progprune._env import env_seconds
from progprune.errors import BadInput, one_line
from progprune.storage.layout import LAYOUT
from progprune.storage.lockio import STORE_ERRORS, LocalLockIO, ObjectLockIO, parse_record

LOCK_NAME = LAYOUT.lock[-1]
LEASE_ENV = "PROGPRUNE_LOCK_LEASE_S"
DEFAULT_LEASE_S = 120.0
# A lease is how long a silent holder keeps the output; a newcomer may wait that long. A
# holder refreshes every 5 s at most, so 10 minutes is 120 missed heartbeats: any longer
# lease (flag, environment or a lock record) only makes the next sweep wait for nothing.
MAX_LEASE_S = 600.0
SETTLE_ENV = "PROGPRUNE_LOCK_SETTLE_S"
DEFAULT_SETTLE_S = 2.0


def lease_seconds(lease_s: float | None = None) -> float:
    """The lock lease: the argument, else $PROGPRUNE_LOCK_LEASE_S, else 120 s; at most
    MAX_LEASE_S."""
    if lease_s is not None:
        if not 0 < lease_s <= MAX_LEASE_S:
            raise BadInput(f"lock lease: expected seconds > 0 and <= {MAX_LEASE_S:g}, got {lease_s}")
        return float(lease_s)
    return env_seconds(LEASE_ENV, DEFAULT_LEASE_S, maximum=MAX_LEASE_S)


def settle_seconds() -> float:
    """How long an object-store claim settles before it is read back: $PROGPRUNE_LOCK_SETTLE_S,
    else 2 s."""
    return env_seconds(SETTLE_ENV, DEFAULT_SETTLE_S, allow_zero=True)


def heartbeat_interval(lease_s: float) -> float:
    """How often a holder refreshes its lease: a quarter of it, at most 5 s (so a second
    sweep learns in seconds that the holder is alive), at least 0.2 s."""
    return max(0.2, min(lease_s / 4, 5.0))


@contextmanager
def hold(store, lease_s: float | None = None, break_lock: bool = False, wait: bool = True,
         on_wait=print, settle_s: float | None = None):
    """Hold `store`'s lock for the body (yields the `Lease`); see the module docstring.
    `lease_s` defaults to $PROGPRUNE_LOCK_LEASE_S, else 120 s. On an object store every
    claim is written, left to settle for `settle_s` ($PROGPRUNE_LOCK_SETTLE_S, 2 s) and
    read back (see README: there is no conditional PUT, so this is best effort)."""
    lease_s = lease_seconds(lease_s)
    settle = settle_seconds() if settle_s is None else settle_s
    store.check_kinds(files=[LAYOUT.lock])  # a directory there is no lock of ours: one line, not a traceback
    if store.local:
        os.makedirs(store.root, exist_ok=True)
        io = LocalLockIO(store.path(*LAYOUT.lock))
    else:
        io = ObjectLockIO(store.fs, store.path(*LAYOUT.lock), settle)
    lease = Lease(store, io, lease_s, on_wait)
    lease._acquire(break_lock=break_lock, wait=wait)
    try:
        yield lease
    finally:
        lease._release()


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


class Lease:
    """A held output lock. `lost` turns true when the heartbeat finds the lock no longer
    ours (taken over after we failed to refresh for a lease, or broken with --break-lock);
    `check()` raises then, so a driver can stop before writing more."""

    def __init__(self, store, io, lease_s: float, on_wait):
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
            rec = parse_record(raw)
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
                why = f"no heartbeat for {age:.0f}s, lease {_lease_of(rec, self.lease_s):.0f}s{_capped(rec)}"
            else:
                state, raw2, why = self._watch(raw, rec)
                if state == "gone":
                    continue
                if state == "alive":
                    self._refuse(parse_record(raw2))
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
                     f"waiting up to {wait_for:.0f}s for a heartbeat (lease {lease:.0f}s{_capped(rec)})")
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
                    rec = parse_record(raw) if raw is not None else {}
                    if rec.get("token") != self.token:
                        self.lost, self.lost_to = True, rec.get("holder", "nobody (the lock was removed)")
                        self.on_wait(f"lock: warning: lost the lock on {self.store.display()} to {self.lost_to}")
                        return
                    self.io.replace(self._record())
                    self.heartbeats += 1
                    self._last_ok = time.monotonic()
            except STORE_ERRORS as e:  # a transient store error: try again next beat
                self.on_wait(f"lock: heartbeat failed ({one_line(e, with_type=True)})")

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
            if raw is not None and parse_record(raw).get("token") == self.token:
                self.io.remove(raw)


def _lease_of(rec: dict, default: float) -> float:
    """The lease a record states, at most MAX_LEASE_S; `default` when it states none."""
    try:
        v = float(rec.get("lease_s"))
        return min(v, MAX_LEASE_S) if v > 0 else default  # nan fails v > 0
    except (TypeError, ValueError):
        return default


def _capped(rec: dict) -> str:
    """", its record asks for Ns, above the maximum" when the record's lease was cut."""
    try:
        v = float(rec.get("lease_s"))
    except (TypeError, ValueError):
        return ""
    return f"; its record asks for {v:.0f}s, more than the {MAX_LEASE_S:.0f}s maximum" if v > MAX_LEASE_S else ""


def _age(rec: dict) -> float | None:
    try:
        return max(0.0, time.time() - float(rec["heartbeat_at"]))
    except (KeyError, TypeError, ValueError):
        return None
