"""Per-line spool files: the audio of the part being recorded, on disk until it is sealed.

A spool is a raw int16 file named by its generation (``<line>.<gen>.pcm``). The recorder's state
file names the generation and how many frames of it are committed; on restart the spool is cut
back to that length, so audio that was appended after the last checkpoint is simply read from
the ring journal again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from linerec_contract.durable import fsync_dir

BYTES_PER_FRAME = 2


class Spool:
    """Append-only int16 mono file for one line's open part."""

    def __init__(self, folder: Path, line: str, gen: int) -> None:
        self.path = folder / f"{line}.{gen}.pcm"
        self.gen = gen
        self.found = self.path.exists()
        """False when the file did not exist (it is created empty)."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if not self.found:
            # Durability: the next checkpoint names this file; its folder entry must survive a
            # power cut with it, or the part's committed audio would be lost.
            fsync_dir(folder)
        self.frames = os.fstat(self._fd).st_size // BYTES_PER_FRAME

    def truncate(self, frames: int) -> None:
        os.ftruncate(self._fd, frames * BYTES_PER_FRAME)
        self.frames = frames

    def cut(self, frames: int) -> None:
        """Drop the frames from ``frames`` on (a call end trims its trailing silence). Only the
        length in use changes: the file keeps its bytes, so a crash before the next checkpoint
        still finds every frame the last checkpoint declared (a shorter file means a loss)."""
        self.frames = min(frames, self.frames)

    def append(self, pcm: np.ndarray) -> None:
        data = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
        if data:
            os.pwrite(self._fd, data, self.frames * BYTES_PER_FRAME)
            self.frames += len(data) // BYTES_PER_FRAME

    def overwrite(self, start: int, pcm: np.ndarray) -> None:
        """Replace frames from ``start`` in place (PCI masking of audio already spooled); frames
        past the end are not added."""
        n = max(0, min(pcm.shape[0], self.frames - start))
        if start < 0 or n == 0:
            return
        data = np.ascontiguousarray(pcm[:n], dtype="<i2").tobytes()
        os.pwrite(self._fd, data, start * BYTES_PER_FRAME)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.frames if stop is None else min(stop, self.frames)
        if stop <= start:
            return np.zeros(0, dtype=np.int16)
        data = os.pread(self._fd, (stop - start) * BYTES_PER_FRAME, start * BYTES_PER_FRAME)
        return np.frombuffer(data, dtype="<i2").astype(np.int16)

    def sync(self) -> None:
        # Durability: the frames the next checkpoint declares committed must be on disk first.
        os.fdatasync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def remove_unreferenced(folder: Path, keep: set[Path]) -> None:
    """Delete spool files that no committed state refers to (left by a crash)."""
    removed = False
    for path in folder.glob("*.pcm"):
        if path not in keep:
            path.unlink()
            removed = True
    if removed:
        fsync_dir(folder)
