"""The sweep output: a local directory or an object-store URI, through pyarrow.fs.

What goes where under the root is `storage.layout`'s part; the lease lock, `storage.lease`'s.
Every write is atomic: a local temp file renamed into place, or one object PUT (a multipart
upload appears whole). Files follow the umask. Copies stream in chunks, never a whole file
in memory.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from progprune._atomic import atomic_path, nearest_existing
from progprune._env import env_seconds
from progprune.errors import BadInput, one_line
from progprune.storage.lease import hold
from progprune.storage.lockio import STORE_ERRORS

CHUNK = 1 << 20  # streamed copies move 1 MiB at a time

# The first call to a remote store is a probe, bounded in time: pyarrow's GCS client
# retries a missing credential for 15 minutes (in C++, deaf to Ctrl-C), S3's answers in
# seconds. The probe asks GCS to give up after PROBE_RETRY_S and waits for any store at
# most $PROGPRUNE_STORE_PROBE_S (30 s), in a thread, so Ctrl-C ends the wait.
PROBE_ENV = "PROGPRUNE_STORE_PROBE_S"
DEFAULT_PROBE_S = 30.0
MAX_PROBE_S = 600.0
PROBE_RETRY_S = 10
_REMOTE_HINTS = {
    "gs": "GCS needs credentials (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default "
          "login`) and network access to storage.googleapis.com",
    "s3": "S3 needs credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), the "
          "bucket's region (AWS_DEFAULT_REGION or ?region=) and network access to its endpoint",
}


def redact(uri: str) -> str:
    """Drop any credentials embedded in a URI (s3://KEY:SECRET@bucket)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


# probe threads given up on while still inside the client's C++ call
_ABANDONED: list[threading.Thread] = []


def probe_stuck() -> bool:
    """Whether a store probe that was given up on is still waiting for its answer. Arrow's
    S3 client, finalised at interpreter exit, then waits for that request (measured: the
    error line after 2 s, the process ended after 100 s); a CLI about to exit ends the
    process at once instead (nothing of ours is in flight: the probe runs before any work)."""
    return any(t.is_alive() for t in _ABANDONED)


class Store:
    """One output, local or remote: paths are tuples of parts under `root` (see `layout`)."""

    def __init__(self, uri: str, label: str = "output"):
        """`label` names the store in the error when `uri` cannot be opened."""
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
            except (ValueError, OSError, pa.ArrowException) as e:  # a bad URI, or a bucket not found
                raise BadInput(f"{label}: cannot open {redact(uri)}: {one_line(e)}") from None
        self.label = label
        self._probed = self.local  # a remote store is probed on first use (see `fs`)

    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow file system; on a remote store the first use probes it (`probe`)."""
        if not self._probed:
            self.probe()
        return self._fs

    @fs.setter
    def fs(self, value: pafs.FileSystem) -> None:
        self._fs = value

    def probe(self) -> None:
        """Fail in bounded time, with one line naming the scheme and why, when a remote
        store cannot be reached (no credentials, no network): one metadata call on the root,
        waited for at most $PROGPRUNE_STORE_PROBE_S. Local stores need no probe."""
        if self._probed:
            return
        scheme = self.uri.split("://", 1)[0].lower()
        deadline = env_seconds(PROBE_ENV, DEFAULT_PROBE_S, maximum=MAX_PROBE_S)
        fs, root = self._fs, self.root
        if scheme in ("gs", "gcs") and "retry_limit_seconds=" not in self.uri:
            # a probe of its own that gives up in seconds; the store keeps GCS's own retries
            sep = "&" if "?" in self.uri else "?"
            fs, root = pafs.FileSystem.from_uri(f"{self.uri}{sep}retry_limit_seconds={PROBE_RETRY_S}")
        result: dict = {}
        done = threading.Event()

        def call():
            try:
                result["info"] = fs.get_file_info(root)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                result["error"] = e
            finally:
                done.set()

        # a daemon thread: one stuck in the client's C++ cannot keep the process alive
        thread = threading.Thread(target=call, name="progprune-store-probe", daemon=True)
        thread.start()
        hint = _REMOTE_HINTS.get(scheme, "check the network and the credentials")
        where = f"{self.label}: cannot reach {redact(self.uri)} ({scheme}://)"
        if not done.wait(deadline):  # Ctrl-C ends this wait
            _ABANDONED.append(thread)
            raise BadInput(f"{where}: no answer within {deadline:.0f}s ({PROBE_ENV}); {hint}")
        e = result.get("error")
        if isinstance(e, STORE_ERRORS):
            raise BadInput(f"{where}: {one_line(e, limit=300)}; {hint}")
        if e is not None:
            raise e
        self._probed = True

    def __repr__(self) -> str:
        return f"Store({redact(self.uri)})"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.local else os.path.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A location other tools (Ray Train's storage_path) can open."""
        return self.path(*parts) if self.local else self.uri.rstrip("/") + "/" + "/".join(parts)

    def display(self, *parts: str) -> str:
        return self.path(*parts) if self.local else redact(self.uri.rstrip("/") + "/" + "/".join(parts))

    # ---- basic IO -------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.kind(*parts) != pafs.FileType.NotFound

    def kind(self, *parts: str) -> pafs.FileType:
        """File, Directory or NotFound (an object-store prefix with objects under it is a
        Directory)."""
        return self.fs.get_file_info(self.path(*parts)).type

    @contextmanager
    def open_input(self, *parts: str):
        """A seekable reader (what Parquet needs to read a footer first)."""
        with self.fs.open_input_file(self.path(*parts)) as f:
            yield f

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
        except OSError:  # absent is fine
            pass

    def delete(self, *parts: str) -> None:
        try:
            self.fs.delete_file(self.path(*parts))
        except OSError:  # absent is fine
            pass

    # ---- checks and locking ---------------------------------------------------------
    def check_writable(self, probe_write: bool = True) -> None:
        """Fail in seconds, before any work, if the output cannot be written. Without
        `probe_write` (a dry run, which writes nothing): a local output is judged from the
        filesystem as it is; a bucket is not checked."""
        if self.local:
            why = self._local_obstacle()
            if why:
                raise BadInput(f"output: cannot write to {self.display()}: {why}; "
                               "choose a writable location with --output")
        else:
            self.probe()
        if not probe_write:
            return
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(b"ok", probe)
            self.delete(probe)
        except STORE_ERRORS as e:
            raise BadInput(f"output: cannot write to {self.display()}: {one_line(e)}; "
                           "choose a writable location with --output") from None

    def _local_obstacle(self) -> str | None:
        """Why a directory cannot be made or written at the (local) root, judged from the
        file system as it is, or None. A symbolic link counts as what it points to; one
        that points nowhere (a dangling link, at the root or above it) is named as such."""
        path = nearest_existing(self.root)  # the closest part that exists, links included
        if os.path.islink(path) and not os.path.exists(path):
            it = "it" if path == self.root else path
            return f"{it} is a symbolic link to {os.readlink(path)}, which does not exist"
        if not os.path.isdir(path):
            return f"{'it' if path == self.root else path} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"no write permission on {path}"
        return None

    def check_kinds(self, files=(), dirs=()) -> None:
        """Refuse (one line, naming the path) when a part the output uses as a file is a
        directory, or one it uses as a directory is a file: what would otherwise fail
        with a traceback when it is first written, after the work."""
        for parts, want in [*((p, pafs.FileType.File) for p in files),
                            *((p, pafs.FileType.Directory) for p in dirs)]:
            kind = self.kind(*parts)
            if kind not in (pafs.FileType.NotFound, want):
                what = "a directory" if kind == pafs.FileType.Directory else "not a directory"
                should = "file" if want == pafs.FileType.File else "directory"
                raise BadInput(f"output: {self.display(*parts)} is {what}, where this output keeps its "
                               f"{should} {'/'.join(parts)}; move it away or choose another --output")

    def lock(self, lease_s: float | None = None, break_lock: bool = False, wait: bool = True,
             on_wait=print, settle_s: float | None = None):
        """One sweep at a time per output: a context manager holding the lease on this
        output and yielding it (`storage.lease.hold`, which says how a lock found on entry
        is treated)."""
        return hold(self, lease_s=lease_s, break_lock=break_lock, wait=wait, on_wait=on_wait, settle_s=settle_s)
