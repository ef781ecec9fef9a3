"""Durable file operations: the one place where fsync discipline lives.

Every helper here keeps the promise "after this returns, the data survives a power cut":
write to a temporary file in the same folder, fsync it, rename it over the target, and fsync
the folder so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make renames and unlinks inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = 0o750) -> None:
    """Create ``path`` and every missing level above it, durably; a no-op when it exists.

    Raises OSError when ``path`` (or a level above it) exists and is not a folder.
    """
    path = Path(path)
    if path.is_dir():
        return
    missing: list[Path] = []
    level = path
    while not level.is_dir():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(folder)) from None
            continue
        # Durability: a new folder's entry lives in its parent; sync it so the folder (and
        # whatever is later made durable inside it) survives a power cut.
        fsync_dir(folder.parent)


def tmp_name(path: Path) -> Path:
    """The temporary sibling used while ``path`` is being written (ignored by readers)."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    tmp = tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        # Durability: the file's bytes are on disk before the rename makes them visible.
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    # Durability: the rename survives a power cut only once the folder is synced.
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    """Atomically write ``obj`` as canonical, human-readable JSON."""
    atomic_write(path, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode(), mode=mode)


def durable_unlink(path: Path) -> None:
    """Remove ``path`` (if present) and make the removal durable."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)


def write_status(path: Path, obj: Any) -> None:
    """Publish a small, best-effort status file for live views (atomic, not fsynced).

    Status files are advisory: losing the latest one in a power cut is harmless.
    """
    tmp = tmp_name(path)
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)
