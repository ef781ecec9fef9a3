"""In-memory FileIO for the ring tests: records every write and sync, counts reads, fake clock.

A fake, because the crash-consistency checker needs to replay and tear individual writes, which a
real file system does not let a test do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.buffer import FileIO


class ReadBudgetExceeded(Exception):
    """Recovery or a reader read more than the test allows (a loop, or a scan of the whole ring)."""


@dataclass
class Write:
    path: str
    offset: int
    data: bytes


@dataclass
class Sync:
    path: str


class MemIO(FileIO):
    """Files are bytearrays keyed by path; ``log`` lists writes and syncs in order."""

    def __init__(self, files: dict[str, bytearray] | None = None) -> None:
        self.files: dict[str, bytearray] = files if files is not None else {}
        self.fds: dict[int, str] = {}
        self.log: list[Write | Sync] = []
        self.now = 0.0
        self.reads = 0
        self.read_budget: int | None = None
        self._next_fd = 100

    def _fd(self, path: str) -> int:
        self._next_fd += 1
        self.fds[self._next_fd] = path
        return self._next_fd

    def open(self, path: Path, *, write: bool) -> int:
        if str(path) not in self.files:
            raise FileNotFoundError(str(path))
        return self._fd(str(path))

    def create(self, path: Path) -> int:
        self.files[str(path)] = bytearray()
        return self._fd(str(path))

    def close(self, fd: int) -> None:
        del self.fds[fd]

    def size(self, fd: int) -> int:
        return len(self.files[self.fds[fd]])

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self.reads += 1
        if self.read_budget is not None and self.reads > self.read_budget:
            raise ReadBudgetExceeded(f"more than {self.read_budget} reads")
        return bytes(self.files[self.fds[fd]][offset : offset + size])

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        data = b"".join(buffers)
        buf = self.files[self.fds[fd]]
        if len(buf) < offset + len(data):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset : offset + len(data)] = data
        self.log.append(Write(self.fds[fd], offset, data))

    def fdatasync(self, fd: int) -> None:
        self.log.append(Sync(self.fds[fd]))

    def fsync(self, fd: int) -> None:
        self.log.append(Sync(self.fds[fd]))

    def allocate(self, fd: int, size: int) -> None:
        buf = self.files[self.fds[fd]]
        if len(buf) < size:
            buf.extend(bytes(size - len(buf)))

    def lock(self, fd: int) -> bool:
        return True

    def exists(self, path: Path) -> bool:
        return str(path) in self.files

    def rename(self, src: Path, dst: Path) -> None:
        self.files[str(dst)] = self.files.pop(str(src))
        for fd, p in self.fds.items():
            if p == str(src):
                self.fds[fd] = str(dst)

    def fsync_dir(self, path: Path) -> None:
        pass

    def monotonic(self) -> float:
        return self.now
