"""The single writer of a ring journal: create or recover, append records, sync on a timer."""

from __future__ import annotations

import logging
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from appliance.buffer.fileio import FileIO
from appliance.buffer.format import (
    FILE_HEADER_SIZE,
    FileHeader,
    Flags,
    RingError,
    SampleFormat,
    check_geometry,
    encode_file_header,
    encode_header,
)
from appliance.buffer.recovery import SlotFile, locate_newest, read_file_header
from linerec_contract.errors import ConfigError, FormatError

log = logging.getLogger(__name__)


class RingWriter:
    """Appends records to one stream's journal; never waits on readers."""

    def __init__(
        self, *, io: FileIO, fd: int, path: Path, geo: FileHeader, next_seq: int,
        sync_interval_s: float, recovery_note: str | None,
    ) -> None:
        """Use :meth:`open`."""
        self._io = io
        self._fd: int | None = fd
        self._path = path
        self._geo = geo
        # The append hot path reads these plain attributes, not the dataclass's properties.
        self._stream_id = geo.stream_id
        self._slot_count = geo.slot_count
        self._slot_size = geo.slot_size
        self._max_payload = geo.max_payload
        self._next_seq = next_seq
        self._synced_seq: int | None = next_seq - 1 if next_seq > geo.first_seq else None
        self._sync_interval = sync_interval_s
        self._last_sync = io.monotonic()
        self._boot_id = secrets.token_bytes(16)
        self.recovery_note = recovery_note

    @classmethod
    def open(
        cls, path: Path, *, stream_id: int, size_bytes: int, slot_size: int = 8192,
        sync_interval_s: float = 0.5, io: FileIO | None = None,
    ) -> RingWriter:
        """Create a preallocated journal at ``path`` or recover the one there.

        A file that is not a usable journal of this geometry is moved aside to
        ``<name>.bad-<UTC timestamp>`` and a fresh journal starts; the reason is in
        ``recovery_note``.
        """
        io = io or FileIO()
        path = Path(path)
        slot_count = check_geometry(slot_size, size_bytes, stream_id)
        if not sync_interval_s >= 0:
            raise ConfigError(f"sync_interval_s {sync_interval_s}: expected a number >= 0")
        note: str | None = None
        first_seq = 0
        if io.exists(path):
            fd = io.open(path, write=True)
            try:
                if not io.lock(fd):
                    raise RingError(f"{path}: another writer holds the journal lock")
                try:
                    geo = read_file_header(io, fd, path)
                    _same_geometry(geo, path, slot_size, slot_count, stream_id)
                except FormatError as err:
                    note = str(err)
                    first_seq = _continue_after(io, fd, path)
                    _move_aside(io, path, note)
                else:
                    newest = locate_newest(SlotFile(io, fd, geo))
                    # Durability: what a crashed writer left in the page cache is on disk before
                    # this writer reports it as synced.
                    io.fdatasync(fd)
                    next_seq = geo.first_seq if newest is None else newest.seq + 1
                    writer = cls(
                        io=io, fd=fd, path=path, geo=geo, next_seq=max(next_seq, geo.first_seq),
                        sync_interval_s=sync_interval_s, recovery_note=None,
                    )
                    fd = -1  # owned by the writer now
                    return writer
            finally:
                if fd >= 0:
                    io.close(fd)
        geo = FileHeader(
            slot_size=slot_size, slot_count=slot_count, stream_id=stream_id,
            created_ns=time.time_ns(), first_seq=first_seq, journal_id=secrets.token_bytes(16),
        )
        fd = _create(io, path, geo)
        return cls(
            io=io, fd=fd, path=path, geo=geo, next_seq=first_seq,
            sync_interval_s=sync_interval_s, recovery_note=note,
        )

    @property
    def max_payload(self) -> int:
        """Bytes of payload that fit one slot."""
        return self._geo.max_payload

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def boot_id(self) -> bytes:
        return self._boot_id

    @property
    def synced_seq(self) -> int | None:
        """Highest seq covered by a completed fdatasync (survives a power cut), None if none."""
        return self._synced_seq

    @property
    def header(self) -> FileHeader:
        return self._geo

    def append(
        self, payload: bytes, *, frames: int, channels: int, rate: int,
        sample_format: SampleFormat, frame_pos: int, flags: Flags = Flags.NONE,
        gap_frames: int = 0, mono_ns: int | None = None, wall_ns: int | None = None,
    ) -> int:
        """Write one record into its slot and return its seq; FormatError if it does not fit."""
        fd = self._fd
        if fd is None:
            raise RingError(f"{self._path}: ring writer is closed")
        seq = self._next_seq
        head = encode_header(
            self._stream_id, seq, self._boot_id,
            time.monotonic_ns() if mono_ns is None else mono_ns,
            time.time_ns() if wall_ns is None else wall_ns,
            frame_pos, frames, channels, sample_format, rate, flags, gap_frames, payload,
            self._max_payload,
        )
        # One pwritev for header and payload, at the slot's first byte (docs/ring-format.md).
        self._io.pwritev(
            fd, (head, payload), FILE_HEADER_SIZE + seq % self._slot_count * self._slot_size
        )
        self._next_seq = seq + 1
        now = self._io.monotonic()
        if now - self._last_sync >= self._sync_interval:
            self._sync(fd, now)
        return seq

    def sync(self) -> None:
        """Make every appended record survive a power cut now."""
        self._sync(self._require_open(), self._io.monotonic())

    def close(self) -> None:
        """Sync and release the journal (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._synced_seq != self._next_seq - 1 and self._next_seq > self._geo.first_seq:
                self._sync(fd, self._io.monotonic())
        finally:
            self._io.close(fd)

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _sync(self, fd: int, now: float) -> None:
        # Durability: records appended so far survive a power cut (the documented loss window is
        # the sync interval); fdatasync also commits the extent conversion of preallocated space.
        self._io.fdatasync(fd)
        self._last_sync = now
        if self._next_seq > self._geo.first_seq:
            self._synced_seq = self._next_seq - 1

    def _require_open(self) -> int:
        if self._fd is None:
            raise RingError(f"{self._path}: ring writer is closed")
        return self._fd


def _same_geometry(
    geo: FileHeader, path: Path, slot_size: int, slot_count: int, stream_id: int
) -> None:
    if (geo.slot_size, geo.slot_count, geo.stream_id) != (slot_size, slot_count, stream_id):
        raise FormatError(
            f"{path}: geometry slot_size={geo.slot_size} slot_count={geo.slot_count} "
            f"stream_id={geo.stream_id}, expected slot_size={slot_size} "
            f"slot_count={slot_count} stream_id={stream_id}"
        )


def _continue_after(io: FileIO, fd: int, path: Path) -> int:
    """Seq to start a replacement journal at: after the old one's newest record if readable."""
    try:
        geo = read_file_header(io, fd, path)
    except (FormatError, OSError):
        return 0
    newest = locate_newest(SlotFile(io, fd, geo))
    return geo.first_seq if newest is None else max(geo.first_seq, newest.seq + 1)


def _move_aside(io: FileIO, path: Path, reason: str) -> Path:
    """Rename a bad journal to ``<name>.bad-<UTC timestamp>`` (never delete evidence)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while io.exists(dest):
        dest = path.with_name(f"{path.name}.bad-{stamp}-{n}")
        n += 1
    io.rename(path, dest)
    # Durability: the move survives a power cut, so the bad file is never mistaken for a journal.
    io.fsync_dir(path.parent)
    log.warning("ring journal %s moved aside to %s: %s", path, dest.name, reason)
    return dest


def _create(io: FileIO, path: Path, geo: FileHeader) -> int:
    """Create the preallocated journal atomically and return it open, locked, for writing."""
    tmp = path.with_name(f".{path.name}.tmp-create")
    fd = io.create(tmp)
    try:
        if not io.lock(fd):
            raise RingError(f"{tmp}: another writer is creating this journal")
        io.allocate(fd, geo.file_size)
        io.pwritev(fd, [encode_file_header(geo)], 0)
        # Durability: header and allocation are on disk before the rename publishes the journal.
        io.fsync(fd)
        io.rename(tmp, path)
        # Durability: the new name survives a power cut.
        io.fsync_dir(path.parent)
    except BaseException:
        io.close(fd)
        raise
    return fd

