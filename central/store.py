"""The durable archive: every accepted segment as its signed manifest plus its age payload.

Objects, per device ``<dev>`` and segment number ``<seq>``, in the storage backend chosen in
``central.toml`` (:mod:`central.backends`: files under ``store/`` by default, or an S3 bucket)::

    <dev>/<seq:012d>.age             the encrypted payload, written first
    <dev>/<seq:012d>.manifest.json   the signed manifest, written last: the commit point

A segment exists in the store exactly when its manifest file exists. Files are never
overwritten and never deleted: an identical segment stored again is a "duplicate", a different
segment claiming the same (device, seq) goes to ``quarantine/`` with a reason, beside the one
already stored. Objects are written once and never replaced (the backend refuses to). A payload
without a manifest is the torn tail of an interrupted ``put``: the next ``put`` of that segment
discards it and writes its own (nothing was acknowledged for it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.durable import atomic_write
from appliance.errors import ApplianceError, FormatError, VerificationError
from appliance.seal import SealedSegment
from appliance.sync.protocol import DEVICE_ID_RE
from central.backends import ObjectExists, ObjectStore, open_object_store
from central.home import Home, make_dirs

PutResult = Literal["stored", "duplicate"]
MANIFEST_SUFFIX = ".manifest.json"
PAYLOAD_SUFFIX = ".age"
_NAME_RE = re.compile(r"^([0-9]{12})\.manifest\.json$")


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

    def __init__(self, home: Home, objects: ObjectStore | None = None) -> None:
        self.home = home
        self.root = home.store_dir
        self.objects = objects or open_object_store(home.config_path, home.store_dir)

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
    def _locked(self, dev: str) -> Iterator[None]:
        """Serialise puts for one device across threads and processes (shared subscriptions)."""
        folder = self.root / dev
        make_dirs(folder)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writing ---------------------------------------------------------------------------

    def put(self, seg: SealedSegment) -> PutResult:
        """Store ``seg`` durably; "duplicate" when exactly this segment is already stored.

        Raises :class:`SegmentConflict` (after quarantining ``seg``) when a different segment
        with the same device and seq is already stored. The caller has verified ``seg``.
        """
        ref = self.ref(seg.device_id, seg.seq)
        manifest_json = seg.signed_manifest_json()
        with self._locked(seg.device_id):
            if self.objects.exists(ref.manifest_key):
                if self._same_as_stored(ref, seg):
                    return "duplicate"
                old = self.load(seg.device_id, seg.seq)
                reason = (
                    f"conflict: {seg.device_id} seq {seg.seq} is already stored with manifest "
                    f"sha256 {old.manifest_sha256}; this one has {seg.manifest_sha256}"
                )
                where = self.quarantine(
                    seg.device_id, seg.seq, (manifest_json, seg.payload), reason
                )
                raise SegmentConflict(reason, where)
            try:
                # write_once is durable (fsync, or the S3 answer) before it returns. Promise
                # kept: the payload is whole before the manifest (the commit point) names it.
                self._write_payload(ref, seg.payload)
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

    def _write_payload(self, ref: StoredRef, payload: bytes) -> None:
        """Write the payload, or keep the one a torn put of this very segment left behind
        (write_once made it whole and durable); a different one is discarded: no manifest
        names it and nothing acknowledged it."""
        if self.objects.exists(ref.payload_key):
            left = self.objects.read(ref.payload_key)
            if hashlib.sha256(left).digest() == hashlib.sha256(payload).digest():
                return
            self.objects.discard_uncommitted(ref.payload_key)
        self.objects.write_once(ref.payload_key, payload)

    def _same_as_stored(self, ref: StoredRef, seg: SealedSegment) -> bool:
        stored = self.objects.read(ref.manifest_key)
        payload = self.objects.read(ref.payload_key)
        if stored == seg.signed_manifest_json():
            return hashlib.sha256(payload).digest() == hashlib.sha256(seg.payload).digest()
        try:
            old = SealedSegment.from_parts(stored, payload)
        except FormatError:
            return False
        return bool(
            old.manifest_sha256 == seg.manifest_sha256
            and old.signature == seg.signature
            and old.payload == seg.payload
        )

    def quarantine(
        self,
        dev: str | None,
        seq: int | None,
        blob_or_parts: bytes | tuple[bytes, bytes],
        reason: str,
    ) -> Path:
        """Keep rejected bytes with a reason file; returns the entry's folder.

        ``blob_or_parts`` is the raw message (``message.bin``) or (signed manifest JSON, payload).
        Entries are never removed by this program.
        """
        safe_dev = dev if dev is not None and DEVICE_ID_RE.match(dev) else "_unknown"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        seq_part = f"{seq:012d}" if seq is not None and seq >= 0 else "unknown"
        entry = self.home.quarantine_dir / safe_dev / f"{seq_part}-{stamp}-{uuid.uuid4().hex[:8]}"
        make_dirs(entry)
        if isinstance(blob_or_parts, tuple):
            manifest_json, payload = blob_or_parts
            # atomic_write fsyncs: quarantined evidence survives a power cut like stored segments.
            atomic_write(entry / "payload.age", payload)
            atomic_write(entry / "manifest.json", manifest_json)
        else:
            atomic_write(entry / "message.bin", blob_or_parts)
        text = f"device: {dev}\nseq: {seq}\nreason: {reason}\n"
        # Written last (fsynced by atomic_write): a reason file marks a complete entry.
        atomic_write(entry / "reason.txt", text.encode())
        return entry

    def quarantine_entries(self) -> list[Path]:
        """Complete quarantine entries (those with a reason file)."""
        return sorted(p.parent for p in self.home.quarantine_dir.glob("*/*/reason.txt"))

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

    def manifest_sha256(self, dev: str, seq: int) -> str | None:
        """The stored segment's manifest hash, or None when (dev, seq) is not stored."""
        ref = self.ref(dev, seq)
        if not self.objects.exists(ref.manifest_key):
            return None
        return str(self.load_ref(ref).manifest_sha256)

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
