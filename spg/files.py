"""Files: writing one so that a reader never sees half of it, and opening one for reading only
when it is a regular file.

`atomic_write` (temp file in the same folder, fsync, `os.replace`) writes our checkpoints,
resume states, exported HF folders, summaries and caches; `open_regular_file` refuses a FIFO
(it would block for ever), a device such as /dev/zero (it never ends), a directory or a
socket, and is what the audio and transcript readers open files with.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write", "open_regular_file"]


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file so that `path` holds either the old or the complete new content: write to
    a temporary file in the same folder, flush and fsync it, then os.replace it onto `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)              # mkstemp creates 0600; use the usual mode
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):                      # make the rename itself durable (POSIX)
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for binary reading, refusing (ValueError, not naming the path; callers add
    it) anything but a regular file: a directory, a FIFO (reading would wait for a writer for
    ever), a device such as /dev/zero (it never ends), a socket. Symlinks are followed. The
    file is opened without blocking and checked on the open descriptor (fstat), so what is
    checked is what is read. Raises OSError if it cannot be opened."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise ValueError(f"it is {_file_kind(mode)}, expected a regular file")
    return os.fdopen(descriptor, "rb")
