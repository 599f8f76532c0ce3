"""The sweep output: a local directory or an object-store URI, through pyarrow.fs.

Layout under the output root:
  results.parquet            merged table (rewritten atomically as rows arrive)
  rows/<combo_id>.parquet    one fragment per finished combination (the source of truth)
  bases/<base_key>.pt        base models, shared by every combination that needs them
  sparse/<sparse_key>.pt     sparse-learned models, shared per (model, method, seed)
  combos/<combo_id>/         pruned.pt, final.pt
  train/                     Ray Train run storage (checkpoints for fault tolerance)
  spec.resolved.yaml         the spec with every default filled
  report/                    report.md, plots
Every write is atomic: a local temp file renamed into place, or one object PUT.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager

import pyarrow.fs as pafs

from progprune._atomic import atomic_path
from progprune.errors import ProgpruneError


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
                raise ProgpruneError(f"output: cannot open {_redact(uri)}: {str(e).splitlines()[0]}") from None

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
        with open(local_path, "rb") as f:
            return self.write_bytes(f.read(), *parts)

    @contextmanager
    def local_copy(self, *parts: str):
        """A local path holding the object (the file itself when the store is local)."""
        if self.local:
            yield self.path(*parts)
            return
        d = tempfile.mkdtemp(prefix="progprune-")
        try:
            p = os.path.join(d, os.path.basename(parts[-1]))
            with open(p, "wb") as f:
                f.write(self.read_bytes(*parts))
            yield p
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def list(self, *parts: str) -> list[str]:
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File)

    def delete(self, *parts: str) -> None:
        try:
            self.fs.delete_file(self.path(*parts))
        except (FileNotFoundError, OSError):
            pass

    # ---- checks and locking ---------------------------------------------------------
    def check_writable(self) -> None:
        """Fail in seconds, before any work, if the output cannot be written."""
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(b"ok", probe)
            self.delete(probe)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ProgpruneError(f"output: cannot write to {self.display()}: {first}; "
                                 "choose a writable location with --output") from None

    @contextmanager
    def lock(self):
        """One sweep at a time per output. A lock left by a dead process on this host
        is taken over; any other live holder makes the second sweep refuse."""
        me = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        name = ".lock"
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            p = self.path(name)
            for _ in range(2):
                try:
                    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "w") as f:
                        f.write(me)
                    break
                except FileExistsError:
                    holder = _read_text(p)
                    if _stale(holder):
                        os.unlink(p)
                        continue
                    raise ProgpruneError(
                        f"output {self.display()} is in use by another sweep ({holder.strip()}); "
                        f"wait for it to finish, or delete {p} if that process is gone") from None
        else:
            if self.exists(name):
                holder = self.read_bytes(name).decode(errors="replace")
                raise ProgpruneError(
                    f"output {self.display()} is in use by another sweep ({holder.strip()}); "
                    f"wait for it, or delete {self.display(name)} if it is gone")
            self.write_bytes(me.encode(), name)
        try:
            yield
        finally:
            self.delete(name)


def _read_text(p: str) -> str:
    try:
        with open(p) as f:
            return f.read()
    except OSError:
        return ""


def _stale(holder: str) -> bool:
    parts = holder.split()
    if len(parts) < 2 or parts[0] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False
