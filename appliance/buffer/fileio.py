"""The ring's only door to the operating system, so tests can record or fake every write and sync."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path


class FileIO:
    """Plain POSIX file operations used by the ring writer and readers.

    Tests substitute a subclass that records writes and syncs (crash-consistency checker) or keeps
    files in memory. Every method does one system call's worth of work.
    """

    def open(self, path: Path, *, write: bool) -> int:
        """Open an existing file read-only or read-write."""
        return os.open(path, os.O_RDWR if write else os.O_RDONLY)

    def create(self, path: Path) -> int:
        """Create (or truncate) ``path`` for writing."""
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)

    def close(self, fd: int) -> None:
        os.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        """Write all of ``buffers`` at ``offset`` (retrying short writes)."""
        done = os.pwritev(fd, buffers, offset)
        total = 0
        for buf in buffers:  # a plain loop: sum(map(len, ...)) costs more per ring append
            total += len(buf)
        if done < total:
            rest = b"".join(buffers)[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + done)
                done += n
                rest = rest[n:]

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def allocate(self, fd: int, size: int) -> None:
        """Reserve ``size`` zeroed bytes so later writes cannot fail for lack of space."""
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)

    def lock(self, fd: int) -> bool:
        """Take the single-writer lock; False when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def exists(self, path: Path) -> bool:
        return path.exists()

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def monotonic(self) -> float:
        return time.monotonic()
