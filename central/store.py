"""The durable archive: every accepted segment as its signed manifest plus its age payload.

Files, per device ``<dev>`` and segment number ``<seq>``::

    store/<dev>/<seq:012d>.age             the encrypted payload, written first
    store/<dev>/<seq:012d>.manifest.json   the signed manifest, written last: the commit point

A segment exists in the store exactly when its manifest file exists. Files are never
overwritten and never deleted: an identical segment stored again is a "duplicate", a different
segment claiming the same (device, seq) goes to ``quarantine/`` with a reason, beside the one
already stored. A payload without a manifest is the torn tail of an interrupted ``put`` and is
replaced by the next ``put`` of that segment (nothing was acknowledged for it).
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

from central.home import Home, make_dirs
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ApplianceError, FormatError, VerificationError
from linerec_contract.protocol import DEVICE_ID_RE
from linerec_contract.segment import SealedSegment

PutResult = Literal["stored", "duplicate"]
MANIFEST_SUFFIX = ".manifest.json"
PAYLOAD_SUFFIX = ".age"
_NAME_RE = re.compile(r"^(\d{12})\.manifest\.json$")


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
    manifest_path: Path
    payload_path: Path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Store:
    """The archive under ``home.store_dir``; safe to share between receiver processes."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.root = home.store_dir

    # -- paths -----------------------------------------------------------------------------

    def ref(self, dev: str, seq: int) -> StoredRef:
        if not DEVICE_ID_RE.match(dev):
            raise FormatError(f"device id {dev!r} is invalid (letters, digits, '_.-', max 63)")
        if seq < 0:
            raise FormatError(f"segment number {seq} is negative")
        folder = self.root / dev
        return StoredRef(
            dev,
            seq,
            folder / f"{seq:012d}{MANIFEST_SUFFIX}",
            folder / f"{seq:012d}{PAYLOAD_SUFFIX}",
        )

    def exists(self, dev: str, seq: int) -> bool:
        return self.ref(dev, seq).manifest_path.exists()

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
            if ref.manifest_path.exists():
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
            # atomic_write: temp file + fsync + rename + folder fsync. Promise kept: the payload
            # is whole on disk before the manifest (the commit point) can name it.
            atomic_write(ref.payload_path, seg.payload)
            # Promise kept: once this returns the segment survives a power cut, so an ack may go.
            atomic_write(ref.manifest_path, manifest_json)
        return "stored"

    def _same_as_stored(self, ref: StoredRef, seg: SealedSegment) -> bool:
        stored = ref.manifest_path.read_bytes()
        if stored == seg.signed_manifest_json():
            return _sha256_file(ref.payload_path) == hashlib.sha256(seg.payload).hexdigest()
        try:
            old = SealedSegment.from_parts(stored, ref.payload_path.read_bytes())
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
            manifest_json = ref.manifest_path.read_bytes()
            payload = ref.payload_path.read_bytes()
        except FileNotFoundError as err:
            raise StoreError(
                f"segment {ref.device_id}/{ref.seq} is not in the store ({err.filename} missing)"
            ) from err
        except OSError as err:
            raise StoreError(f"cannot read {err.filename}: {err.strerror}") from err
        try:
            return SealedSegment.from_parts(manifest_json, payload)
        except FormatError as err:
            raise StoreError(f"{ref.manifest_path}: {err}") from err

    def load(self, dev: str, seq: int) -> SealedSegment:
        return self.load_ref(self.ref(dev, seq))

    def manifest_sha256(self, dev: str, seq: int) -> str | None:
        """The stored segment's manifest hash, or None when (dev, seq) is not stored."""
        ref = self.ref(dev, seq)
        if not ref.manifest_path.exists():
            return None
        return str(self.load_ref(ref).manifest_sha256)

    def devices(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and DEVICE_ID_RE.match(p.name)
        )

    def iter_refs(self, dev: str | None = None) -> Iterator[StoredRef]:
        """Committed segments (manifest present), by device then seq."""
        for device in [dev] if dev is not None else self.devices():
            folder = self.root / device
            if not folder.is_dir():
                continue
            seqs = sorted(
                int(m.group(1)) for p in folder.iterdir() if (m := _NAME_RE.match(p.name))
            )
            for seq in seqs:
                yield self.ref(device, seq)

    def iter_segments(self, dev: str | None = None) -> Iterator[SealedSegment]:
        for ref in self.iter_refs(dev):
            yield self.load_ref(ref)
