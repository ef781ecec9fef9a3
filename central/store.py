"""The durable archive: every accepted segment as its signed manifest plus its age payload.

Objects, per device ``<dev>`` and segment number ``<seq>``, in the storage backend chosen in
``central.toml`` (:mod:`central.backends`: files under ``store/`` by default, or an S3 bucket)::

    <dev>/<seq:012d>.age             the encrypted payload, written first
    <dev>/<seq:012d>.manifest.json   the signed manifest, written last: the commit point

A segment exists in the store exactly when its manifest file exists. Files are never
overwritten and never deleted: an identical segment stored again is a "duplicate", a different
segment claiming the same (device, seq) goes to ``quarantine/`` with a reason, beside the one
already stored. Objects are written once and never replaced (the backend refuses to).

Quarantine is evidence, not an archive, and it is bounded (``[limits]`` in central.toml): per
device and in total, in bytes and in entries. A new entry that would pass a bound first drops
the oldest entries (of that device for a device bound), each drop logged and counted; an entry
larger than a bound on its own keeps only its reason. So no box can fill central's disk with
rejected messages.

Chain check and store are one critical section per device: :meth:`Store.device_lock` takes an
exclusive ``flock`` on ``locks/<dev>.lock``, which holds across threads and across the receiver
processes sharing this home. With the PostgreSQL index (receivers on several machines, each with
its own home) it also takes the device's PostgreSQL advisory lock (:mod:`central.devlock`),
which holds across machines. A payload without a manifest is the torn tail of an interrupted
``put``: the next ``put`` of that segment keeps it when it is the same payload and otherwise
discards it and writes its own (nothing was acknowledged for it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from central.backends import ObjectExists, ObjectStore, index_config, open_object_store
from central.devlock import DeviceLockError, PgDeviceLocks
from central.home import Home, Limits, make_dirs
from linerec_contract.canonical import canonical_json
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ApplianceError, FormatError, VerificationError
from linerec_contract.protocol import DEVICE_ID_RE
from linerec_contract.segment import SealedSegment, SpooledSegment

PutResult = Literal["stored", "duplicate"]
MANIFEST_SUFFIX = ".manifest.json"
PAYLOAD_SUFFIX = ".age"
_NAME_RE = re.compile(r"^([0-9]{12})\.manifest\.json$")
QUARANTINE_LOCK = "quarantine.lock"
log = logging.getLogger("central.store")


class StoreError(ApplianceError):
    """The archive on disk is unreadable or inconsistent."""


class SegmentConflict(VerificationError):
    """A different segment arrived for a (device, seq) already stored; it was quarantined."""

    def __init__(self, message: str, quarantine_path: Path) -> None:
        super().__init__(message)
        self.quarantine_path = quarantine_path


@dataclass(frozen=True)
class StoredRef:
    """Where one committed segment lives in the store."""

    device_id: str
    seq: int
    manifest_path: Path  # where the filesystem backend keeps it (absent with other backends)
    payload_path: Path
    manifest_key: str  # the backend's object key
    payload_key: str


class Store:
    """The archive under ``home.store_dir``; safe to share between receiver processes."""

    def __init__(self, home: Home, limits: Limits | None = None,
                 objects: ObjectStore | None = None) -> None:
        self.home = home
        self.root = home.store_dir
        self.objects = objects or open_object_store(home.config_path, home.store_dir)
        self.limits = limits if limits is not None else home.config().limits
        self.counts = {"quarantined": 0, "quarantine_dropped": 0, "quarantine_truncated": 0}
        index = index_config(home.config_path)
        self.shared_locks = (PgDeviceLocks(index.dsn)
                             if index.backend == "postgresql" and index.dsn else None)

    # -- paths -----------------------------------------------------------------------------

    def ref(self, dev: str, seq: int) -> StoredRef:
        if not DEVICE_ID_RE.match(dev):
            raise FormatError(f"device id {dev!r} is invalid (letters, digits, '_.-', max 63)")
        if seq < 0:
            raise FormatError(f"segment number {seq} is negative")
        manifest_key = f"{dev}/{seq:012d}{MANIFEST_SUFFIX}"
        payload_key = f"{dev}/{seq:012d}{PAYLOAD_SUFFIX}"
        return StoredRef(
            dev, seq, self.root / manifest_key, self.root / payload_key, manifest_key, payload_key
        )

    def location(self, key: str) -> str:
        """Where an object lives, as kept in the index (relative to the home for files)."""
        return self.objects.location(key)

    def exists(self, dev: str, seq: int) -> bool:
        return self.objects.exists(self.ref(dev, seq).manifest_key)

    @contextlib.contextmanager
    def device_lock(self, dev: str) -> Iterator[None]:
        """The device's critical section (chain check, store, rotation record), across
        threads and processes: an exclusive flock on ``locks/<dev>.lock``; with the PostgreSQL
        index also across machines: the device's advisory lock on that server. Raises
        :class:`StoreError` when the advisory lock cannot be taken or was lost meanwhile."""
        if not DEVICE_ID_RE.match(dev):
            raise FormatError(f"device id {dev!r} is invalid (letters, digits, '_.-', max 63)")
        shared = (self.shared_locks.hold(dev) if self.shared_locks is not None
                  else contextlib.nullcontext())
        try:
            with exclusive_lock(self.home.locks_dir / f"{dev}.lock"), shared:
                yield
        except DeviceLockError as err:
            raise StoreError(str(err)) from err

    def close(self) -> None:
        """Release the connections kept for the shared device locks."""
        if self.shared_locks is not None:
            self.shared_locks.close()

    # -- writing ---------------------------------------------------------------------------

    def put(self, seg: SealedSegment) -> PutResult:
        """Store ``seg`` durably; "duplicate" when exactly this segment is already stored.

        Raises :class:`SegmentConflict` (after quarantining ``seg``) when a different segment
        with the same device and seq is already stored. The caller has verified ``seg``.
        """
        with self.device_lock(seg.device_id):
            return self.put_locked(seg)

    def put_locked(self, seg: SealedSegment) -> PutResult:
        """:meth:`put` for a caller already inside :meth:`device_lock` of ``seg``'s device."""
        ref = self.ref(seg.device_id, seg.seq)
        manifest_json = seg.signed_manifest_json()
        if self.objects.exists(ref.manifest_key):
            if self._same_as_stored(ref, seg):
                return "duplicate"
            old_sha = self.manifest_sha256(seg.device_id, seg.seq)
            reason = (
                f"conflict: {seg.device_id} seq {seg.seq} is already stored with manifest "
                f"sha256 {old_sha}; this one has {seg.manifest_sha256}"
            )
            payload: bytes | Path = (
                seg.source.path if isinstance(seg, SpooledSegment) and seg.source else seg.payload
            )
            where = self.quarantine(seg.device_id, seg.seq, (manifest_json, payload), reason)
            raise SegmentConflict(reason, where)
        try:
            # write_once is durable (fsync, or the S3 answer) before it returns. Promise
            # kept: the payload is whole before the manifest (the commit point) names it.
            self._write_payload(ref, seg)
            # Promise kept: once this returns the segment survives a power cut: ack may go.
            self.objects.write_once(ref.manifest_key, manifest_json)
        except ObjectExists as err:
            # Another machine's receiver (not under our lock) is storing this seq: no ack
            # now; the redelivery finds it stored and answers "duplicate" or "conflict".
            raise StoreError(
                f"{self.location(str(err))} appeared during a put of "
                f"{seg.device_id}/{seg.seq}; try again"
            ) from err
        return "stored"

    def _write_payload(self, ref: StoredRef, seg: SealedSegment) -> None:
        """Write the payload (a spooled one streamed from its file), or keep the one a torn
        put of this very segment left behind (write_once made it whole and durable); a
        different one is discarded: no manifest names it and nothing acknowledged it."""
        if self.objects.exists(ref.payload_key):
            if self.objects.sha256(ref.payload_key) == seg.payload_sha256:
                return
            self.objects.discard_uncommitted(ref.payload_key)
        if isinstance(seg, SpooledSegment) and seg.source is not None:
            src = seg.source
            self.objects.write_once_file(ref.payload_key, src.path, src.size, src.sha256)
        else:
            self.objects.write_once(ref.payload_key, seg.payload)

    def _same_as_stored(self, ref: StoredRef, seg: SealedSegment) -> bool:
        """Same signed manifest and same payload, compared by SHA-256 (the stored payload is
        hashed block by block, never read whole)."""
        stored = self.objects.read(ref.manifest_key)
        if stored != seg.signed_manifest_json():
            try:
                old = SealedSegment.from_parts(stored, b"")
            except FormatError:
                return False
            if old.manifest_sha256 != seg.manifest_sha256 or old.signature != seg.signature:
                return False
        try:
            return self.objects.sha256(ref.payload_key) == seg.payload_sha256
        except FileNotFoundError:
            return False

    def quarantine(
        self,
        dev: str | None,
        seq: int | None,
        blob_or_parts: bytes | Path | tuple[bytes, bytes | Path],
        reason: str,
    ) -> Path:
        """Keep rejected bytes with a reason file, within the quarantine bounds; returns the
        entry's folder.

        ``blob_or_parts`` is the raw message (``message.bin``) or (signed manifest JSON, payload),
        each as bytes or as a file copied block by block.
        Older entries are dropped to make room (see the module docstring).
        """
        safe_dev = dev if dev is not None and DEVICE_ID_RE.match(dev) else "_unknown"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        seq_part = f"{seq:012d}" if seq is not None and seq >= 0 else "unknown"
        entry = self.home.quarantine_dir / safe_dev / f"{seq_part}-{stamp}-{uuid.uuid4().hex[:8]}"
        files: dict[str, bytes | Path]
        if isinstance(blob_or_parts, tuple):
            files = {"manifest.json": blob_or_parts[0], "payload.age": blob_or_parts[1]}
        else:
            files = {"message.bin": blob_or_parts}
        size = sum(data.stat().st_size if isinstance(data, Path) else len(data)
                   for data in files.values())
        lim = self.limits
        mib = 1024 * 1024
        cap = min(lim.quarantine_mb, lim.quarantine_device_mb) * mib
        text = f"device: {dev}\nseq: {seq}\nreason: {reason}\n"
        if size > cap:
            text += f"evidence: {size} bytes not kept (larger than the quarantine bound of {cap})\n"
            files, size = {}, 0
            self.counts["quarantine_truncated"] += 1
        with exclusive_lock(self.home.locks_dir / QUARANTINE_LOCK):
            self._make_room(safe_dev, size + len(text))
            make_dirs(entry)
            # atomic_write fsyncs: quarantined evidence survives a power cut like stored segments.
            for name, data in files.items():
                if isinstance(data, Path):
                    _atomic_copy(data, entry / name)
                else:
                    atomic_write(entry / name, data)
            # Written last (fsynced by atomic_write): a reason file marks a complete entry.
            atomic_write(entry / "reason.txt", text.encode())
        self.counts["quarantined"] += 1
        return entry

    def _make_room(self, dev: str, size: int) -> None:
        """Drop the oldest entries until one more of ``size`` bytes from ``dev`` fits."""
        lim, mib = self.limits, 1024 * 1024
        entries = self._quarantine_sizes()
        mine = [e for e in entries if e[1].parent.name == dev]
        # The device's own bound: its own oldest entries go first.
        while mine and (sum(e[2] for e in mine) + size > lim.quarantine_device_mb * mib
                        or len(mine) + 1 > lim.quarantine_device_entries):
            entries.remove(self._drop_entry(mine.pop(0)))
        # The total bound: the oldest entry of the device holding the most goes first, so a
        # box flooding rejected messages only ever pushes out its own.
        while entries and (sum(e[2] for e in entries) + size > lim.quarantine_mb * mib
                           or len(entries) + 1 > lim.quarantine_entries):
            held: dict[str, int] = {}
            for entry in entries:
                held[entry[1].parent.name] = held.get(entry[1].parent.name, 0) + entry[2]
            biggest = max(held, key=lambda d: held[d])
            entries.remove(self._drop_entry(next(e for e in entries
                                                 if e[1].parent.name == biggest)))

    def _drop_entry(self, entry: tuple[float, Path, int]) -> tuple[float, Path, int]:
        shutil.rmtree(entry[1], ignore_errors=True)
        self.counts["quarantine_dropped"] += 1
        log.warning("quarantine full: dropped the oldest entry %s (%d bytes)",
                    entry[1].relative_to(self.home.quarantine_dir), entry[2])
        return entry

    def _quarantine_sizes(self) -> list[tuple[float, Path, int]]:
        """(mtime, folder, bytes) of every quarantine entry, oldest first."""
        found = []
        root = self.home.quarantine_dir
        if not root.is_dir():
            return []
        for dev_dir in root.iterdir():
            if not dev_dir.is_dir():
                continue
            for folder in dev_dir.iterdir():
                try:
                    stats = [f.stat() for f in folder.iterdir()]
                    mtime = folder.stat().st_mtime
                except (FileNotFoundError, NotADirectoryError):
                    continue
                found.append((mtime, folder, sum(s.st_size for s in stats)))
        return sorted(found)

    def quarantine_entries(self) -> list[Path]:
        """Complete quarantine entries (those with a reason file)."""
        return sorted(p.parent for p in self.home.quarantine_dir.glob("*/*/reason.txt"))

    def quarantine_bytes(self) -> int:
        return sum(size for _m, _f, size in self._quarantine_sizes())

    # -- reading ---------------------------------------------------------------------------

    def load_ref(self, ref: StoredRef) -> SealedSegment:
        try:
            manifest_json = self.objects.read(ref.manifest_key)
            payload = self.objects.read(ref.payload_key)
        except FileNotFoundError as err:
            raise StoreError(
                f"segment {ref.device_id}/{ref.seq} is not in the store ({err.filename} missing)"
            ) from err
        except OSError as err:
            raise StoreError(f"cannot read {err.filename}: {err.strerror}") from err
        try:
            return SealedSegment.from_parts(manifest_json, payload)
        except FormatError as err:
            raise StoreError(f"{self.location(ref.manifest_key)}: {err}") from err

    def load(self, dev: str, seq: int) -> SealedSegment:
        return self.load_ref(self.ref(dev, seq))

    def manifest_of(self, ref: StoredRef) -> dict[str, Any]:
        """The stored segment's manifest alone (its payload is not read), checked as
        :meth:`load_ref` checks it."""
        try:
            signed = self.objects.read(ref.manifest_key)
        except FileNotFoundError as err:
            raise StoreError(
                f"segment {ref.device_id}/{ref.seq} is not in the store ({err.filename} missing)"
            ) from err
        except OSError as err:
            raise StoreError(f"cannot read {err.filename}: {err.strerror}") from err
        try:
            return SealedSegment.from_parts(signed, b"").manifest
        except FormatError as err:
            raise StoreError(f"{self.location(ref.manifest_key)}: {err}") from err

    def manifest_sha256(self, dev: str, seq: int) -> str | None:
        """The stored segment's manifest hash, or None when (dev, seq) is not stored; the
        payload is not read."""
        ref = self.ref(dev, seq)
        if not self.objects.exists(ref.manifest_key):
            return None
        return hashlib.sha256(canonical_json(self.manifest_of(ref))).hexdigest()

    def retained_until(self, dev: str, seq: int) -> dt.datetime | None:
        """Until when the storage service refuses to delete this segment (Object Lock)."""
        ref = self.ref(dev, seq)
        dates = [d for d in (self.objects.retained_until(ref.manifest_key),
                             self.objects.retained_until(ref.payload_key)) if d is not None]
        return max(dates) if dates else None

    def delete_expired(self, dev: str, seq: int) -> None:
        """Remove a segment for good: only retention calls this, after logging the deletion.
        The manifest (the commit point) goes first, so a crash leaves no half segment."""
        ref = self.ref(dev, seq)
        with self.device_lock(dev):
            self.objects.delete_expired(ref.manifest_key)
            self.objects.delete_expired(ref.payload_key)

    def devices(self) -> list[str]:
        return [name for name in self.objects.list_devices() if DEVICE_ID_RE.match(name)]

    def iter_refs(self, dev: str | None = None) -> Iterator[StoredRef]:
        """Committed segments (manifest present), by device then seq."""
        for device in [dev] if dev is not None else self.devices():
            seqs = sorted(
                int(m.group(1))
                for name in self.objects.list_names(device)
                if (m := _NAME_RE.match(name))
            )
            for seq in seqs:
                yield self.ref(device, seq)

    def iter_segments(self, dev: str | None = None) -> Iterator[SealedSegment]:
        for ref in self.iter_refs(dev):
            yield self.load_ref(ref)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing). Each call opens its own file
    description, so it excludes other threads of this process as well as other processes."""
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` block by block, fsynced, under a temporary name first."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        fout.flush()
        # Durability: quarantined evidence survives a power cut like stored segments.
        os.fsync(fout.fileno())
    os.rename(tmp, dst)
