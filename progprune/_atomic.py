"""One way to write a local file so that readers never see half of it, and where a new one
would go."""
from __future__ import annotations

import os
import secrets
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
    whose parts exist): where a directory made at `path` would be created, so what to check."""
    while not os.path.exists(path):
        parent = os.path.dirname(path.rstrip("/")) or "."
        if parent == path:
            break
        path = parent
    return path
