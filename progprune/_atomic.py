"""One way to write a local file so that readers never see half of it, and where a new one
would go."""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager


def create_new(directory: str, prefix: str = ".tmp-", suffix: str = "") -> str:
    """Create a new empty file with a random name in `directory` and return its path.

    Unlike `tempfile.mkstemp` (always 0600) the file is created 0666 and the kernel applies
    the process umask, so results and artifacts get the mode any other file would get
    (0644 under the usual umask 022; a teammate on a shared volume can read them)."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temp path beside `path`; on success rename it over `path`, else remove it.
    The file's mode follows the umask (see `create_new`)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = create_new(directory, ".tmp-", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def nearest_existing(path: str) -> str:
    """`path` if it exists, else its closest existing ancestor ("." for a relative path none of
    whose parts exist): where a directory made at `path` would be created, so what to check.
    A symlink counts as existing even when its target does not (a dangling link is in the way
    of a directory made there: `os.makedirs` fails on it), so the caller sees it and refuses."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path.rstrip("/")) or "."
        if parent == path:
            break
        path = parent
    return path


def make_dir_new(directory: str, prefix: str) -> str:
    """Create a new empty directory with a random name in `directory` and return its path.
    Created 0777 less the umask (unlike `tempfile.mkdtemp`'s 0700), so a directory that is
    later renamed into place gets the mode any other directory would."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


class StagedDir:
    """A private directory in which a run writes its files, on the filesystem of `dest`, so
    that publishing them there is a rename, never a cross-device copy (a staging folder in
    the temporary directory cannot be renamed onto a tmpfs, a mounted volume, ...).

    It is made inside `dest` when `dest` is already a directory (a mount point included), else
    beside it, in `dest`'s parent, whose missing ancestors are made too. `publish` moves the
    files into `dest`; leaving the `with` block removes the staging directory whatever
    happened (an exception, Ctrl-C), and, unless `publish` ran, the ancestors it made."""

    def __init__(self, dest, prefix: str = ".progprune-"):
        self.dest = os.path.abspath(os.fspath(dest))
        self.prefix = prefix
        self.path: str | None = None
        self._made: list[str] = []  # ancestors made here, outermost first
        self._published = False

    def __enter__(self) -> str:
        home = self.dest if os.path.isdir(self.dest) else os.path.dirname(self.dest)
        missing, d = [], home
        while not os.path.lexists(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:  # another process made it meanwhile: not ours to remove
                continue
            self._made.append(d)
        self.path = make_dir_new(home, self.prefix)
        return self.path

    def publish(self, names) -> None:
        """Put the staged `names` in `dest`, each replacing a file of that name there; a name
        the stage lacks is removed from `dest` (what an earlier run left must not sit beside
        this run's files). A `dest` that does not exist yet becomes the staging directory in
        one rename; else the files move one by one, in the order of `names`."""
        staged = [n for n in names if os.path.lexists(os.path.join(self.path, n))]
        if not os.path.isdir(self.dest) and set(os.listdir(self.path)) == set(staged):
            try:
                os.rename(self.path, self.dest)
                self._published = True
                return
            except OSError:  # dest appeared meanwhile: move the files into it
                os.makedirs(self.dest, exist_ok=True)
        for n in names:
            if n not in staged and os.path.lexists(os.path.join(self.dest, n)):
                os.unlink(os.path.join(self.dest, n))
        for n in staged:
            os.replace(os.path.join(self.path, n), os.path.join(self.dest, n))
        self._published = True

    def __exit__(self, *exc) -> None:
        if self.path and os.path.lexists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        if not self._published:
            for d in reversed(self._made):
                try:
                    os.rmdir(d)
                except OSError:  # something else was put there meanwhile
                    break
