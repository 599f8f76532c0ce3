"""Where a lease's record is kept: one file beside the output, claimed with operations the
storage does atomically (see each class). `storage.lease` decides when to claim."""
from __future__ import annotations

import json
import os
import posixpath
import secrets
import time

import pyarrow as pa
import pyarrow.fs as pafs

from progprune._atomic import create_new

# what a store operation raises when the store fails (pyarrow's IO errors are OSErrors)
STORE_ERRORS = (OSError, pa.ArrowException)


def parse_record(raw: bytes) -> dict:
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


class LocalLockIO:
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
                    and parse_record(moved).get("token") != parse_record(expected).get("token"):
                try:
                    os.link(aside, self.path)  # not ours to remove: put it back
                except FileExistsError:
                    pass
        finally:
            os.unlink(aside)


class ObjectLockIO:
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
        return now is not None and parse_record(now).get("token") == parse_record(data).get("token")

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
                                or parse_record(now).get("token") == parse_record(expected).get("token")):
            try:
                self.fs.delete_file(self.path)
            except OSError:  # absent is fine
                pass
