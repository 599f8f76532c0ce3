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
import uuid
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from progprune._atomic import atomic_path, nearest_existing
from progprune.errors import BadInput, one_line
from progprune.storage.lease import hold
from progprune.storage.lockio import STORE_ERRORS

CHUNK = 1 << 20  # streamed copies move 1 MiB at a time


def redact(uri: str) -> str:
    """Drop any credentials embedded in a URI (s3://KEY:SECRET@bucket)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


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
        except STORE_ERRORS as e:
            raise BadInput(f"output: cannot write to {self.display()}: {one_line(e)}; "
                           "choose a writable location with --output") from None

    def lock(self, lease_s: float | None = None, break_lock: bool = False, wait: bool = True,
             on_wait=print, settle_s: float | None = None):
        """One sweep at a time per output: a context manager holding the lease on this
        output and yielding it (`storage.lease.hold`, which says how a lock found on entry
        is treated)."""
        return hold(self, lease_s=lease_s, break_lock=break_lock, wait=wait, on_wait=on_wait, settle_s=settle_s)
