"""What a path is, when it is not the regular file a reader expects: one phrase for an
error message ("a directory, not a regular file"). Light (os and stat only): the spec loader
uses it before torch is imported, the checkpoint reader after."""
from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def not_a_regular_file(path) -> str | None:
    """None for a regular file (or a link to one); else what the path is instead:
    "not found", "a directory, not a regular file", "a FIFO (named pipe), not a regular file", ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found" if not os.path.islink(path) else "a broken symbolic link"
    except OSError as e:
        return f"not readable ({e.strerror or type(e).__name__})"
    if stat.S_ISREG(mode):
        return None
    what = next((w for test, w in _KINDS if test(mode)), "not a regular file")
    return f"{what}, not a regular file" if what != "not a regular file" else what
