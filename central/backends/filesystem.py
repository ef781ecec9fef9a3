"""The filesystem storage backend: one read-only file per object under ``<home>/store``.

An object is written to a temporary sibling, fsynced, made read-only (0444) and then linked
to its name with ``link(2)``, which fails when the name exists: a stored file is never
overwritten, not even by a racing receiver process. The folder is fsynced after the link.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from central.backends import ObjectExists
from central.home import make_dirs
from linerec_contract.durable import tmp_name
from linerec_contract.segment import COPY_BLOCK

READ_ONLY = 0o444


class FsObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def write_once(self, key: str, data: bytes) -> None:
        self._write(key, [data])

    def write_once_file(self, key: str, source: Path, size: int, sha256: str) -> None:
        """Link ``source`` (fsynced by its writer) to the key when both are on one
        filesystem; copy it block by block otherwise."""
        path = self.path(key)
        make_dirs(path.parent)
        os.chmod(source, READ_ONLY)
        try:
            os.link(source, path)
        except FileExistsError as err:
            raise ObjectExists(key) from err
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            self._write(key, _blocks(source))
            return
        self._sync_dir(path)

    def _write(self, key: str, blocks: Iterable[bytes]) -> None:
        path = self.path(key)
        make_dirs(path.parent)
        # The store writes a key only under its per-device lock, so one temporary name per key
        # suffices; a leftover from a crash is truncated and reused.
        tmp = tmp_name(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, READ_ONLY)
        try:
            for data in blocks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            # Durability: the bytes are on disk before the link makes the object visible.
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.link(tmp, path)  # never replaces: EEXIST when the object is already there
        except FileExistsError as err:
            raise ObjectExists(key) from err
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._sync_dir(path)

    @staticmethod
    def _sync_dir(path: Path) -> None:
        # Durability: the new name survives a power cut only once the folder is synced.
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard_uncommitted(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def delete_expired(self, key: str) -> None:
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # read-only files: only this explicit retention step removes them
            # Durability: the removal survives a power cut once the folder is synced.
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def retained_until(self, key: str) -> dt.datetime | None:
        return None

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        for block in _blocks(self.path(key)):
            digest.update(block)
        return digest.hexdigest()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list_devices(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def list_names(self, device: str) -> list[str]:
        folder = self.root / device
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir())

    def location(self, key: str) -> str:
        return f"{self.root.name}/{key}"


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes, :data:`COPY_BLOCK` at a time."""
    with path.open("rb") as fh:
        while block := fh.read(COPY_BLOCK):
            yield block
