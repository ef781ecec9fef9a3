"""The durable outbox: sealed segments waiting for central's acknowledgement.

One folder, shared by two processes: the recorder adds segments, the uplink sends and removes
them. The blobs are opaque here (wire-format sealed segments from ``appliance.seal``); the
outbox only knows each one's sequence number and the SHA-256 of its payload, which central
echoes in its ack. Files::

    seg-<seq:012d>.sha256     payload SHA-256 (hex, one line); written first, by prepare()
    .seg-<seq:012d>.prep      a prepared blob, not yet visible to readers
    seg-<seq:012d>.seg        a committed blob: pending until acknowledged
    acked.json                {"highest_acked": N}: a number is never reused, even once drained
    rejected/                 segments central refused, with a .reason.json each; never deleted

Two-phase publish: ``prepare`` makes the blob durable under a hidden name, ``commit`` makes it
visible with one rename. The sidecar holding the SHA-256 is durable before the prepared blob
exists, so a committed segment always has its SHA-256. A crash leaves at worst a prepared blob
(the recorder decides, on restart, to commit or discard it) or a stray sidecar (harmless,
overwritten by the next prepare of that number, removed once its number is acknowledged).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.durable import atomic_write, atomic_write_json, durable_unlink, fsync_dir
from appliance.errors import ApplianceError, FormatError, StateDirError

SEG_RE = re.compile(r"^seg-(\d{12})\.seg$")
PREP_RE = re.compile(r"^\.seg-(\d{12})\.prep$")
SIDECAR_RE = re.compile(r"^seg-(\d{12})\.sha256$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_SEQ = 10**12 - 1
ACKED_FILE = "acked.json"
REJECTED_DIR = "rejected"


class OutboxError(ApplianceError):
    """An outbox operation was asked for something the outbox's state does not allow."""


@dataclass(frozen=True)
class Backlog:
    """What is waiting for central: count, total bytes, age of the oldest committed segment."""

    segments: int
    bytes: int
    oldest_age_s: float


def _check_seq(seq: int) -> int:
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise FormatError(f"segment number {seq!r} is invalid (an integer 0..{MAX_SEQ})")
    return seq


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise FormatError(f"payload sha256 {sha!r} is invalid (64 lowercase hex digits)")
    return sha


class Outbox:
    """The outbox folder. Safe for one writer process (recorder) and one reader (uplink)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rejected_dir = path / REJECTED_DIR
        try:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateDirError(f"cannot create outbox folder {self.rejected_dir}: "
                                f"{err.strerror}") from err
        self._lock = threading.Lock()

    # -- names --------------------------------------------------------------------------------

    def seg_path(self, seq: int) -> Path:
        return self.path / f"seg-{_check_seq(seq):012d}.seg"

    def prep_path(self, seq: int) -> Path:
        return self.path / f".seg-{_check_seq(seq):012d}.prep"

    def sidecar_path(self, seq: int) -> Path:
        return self.path / f"seg-{_check_seq(seq):012d}.sha256"

    def _scan(self, pattern: re.Pattern[str], folder: Path | None = None) -> list[int]:
        found = []
        with os.scandir(folder or self.path) as entries:
            for entry in entries:
                match = pattern.match(entry.name)
                if match:
                    found.append(int(match.group(1)))
        found.sort()
        return found

    # -- writer side (recorder) ----------------------------------------------------------------

    def prepare(self, seq: int, blob: bytes, payload_sha256: str) -> None:
        """Make ``blob`` durable under a hidden name; readers do not see it until commit."""
        _check_sha(payload_sha256)
        if self.seg_path(seq).exists():
            raise OutboxError(f"segment {seq} is already committed in {self.path}; "
                              f"a segment number is never reused")
        acked = self.highest_acked()
        was_rejected = (self.rejected_dir / self.seg_path(seq).name).exists()
        if (acked is not None and seq <= acked) or was_rejected:
            raise OutboxError(f"segment {seq} was already sent (highest acknowledged: {acked}); "
                              f"a segment number is never reused, use highest_seq() + 1")
        # Durability: an older prepared blob of this number goes first, so a power cut can
        # never pair it with the new SHA-256 below.
        if self.prep_path(seq).exists():
            durable_unlink(self.prep_path(seq))
        # Durability: the SHA-256 sidecar is on disk (fsynced, renamed, folder synced) before
        # the prepared blob exists, so every prepared or committed blob has its SHA-256.
        atomic_write(self.sidecar_path(seq), (payload_sha256 + "\n").encode())
        # Durability: the blob is written under a temporary name, fsynced, renamed to its
        # prepared name and the folder synced: after a power cut prepared() reports only
        # complete blobs, which the recorder may then commit or discard.
        atomic_write(self.prep_path(seq), blob)

    def commit(self, seq: int) -> None:
        """Make a prepared segment visible to the uplink (one atomic rename)."""
        prep = self.prep_path(seq)
        if not prep.exists():
            raise OutboxError(f"segment {seq} is not prepared in {self.path} "
                              f"(prepared: {self.prepared()})")
        if not self.sidecar_path(seq).exists():
            raise OutboxError(f"segment {seq} has no SHA-256 sidecar in {self.path}; "
                              f"discard it and prepare it again")
        try:
            os.rename(prep, self.seg_path(seq))
        except FileNotFoundError as err:
            raise OutboxError(f"segment {seq} is not prepared in {self.path} "
                              f"(prepared: {self.prepared()})") from err
        # Durability: once commit() returns the segment is pending across a power cut; the
        # recorder may then drop its own copy.
        fsync_dir(self.path)

    def prepared(self) -> list[int]:
        """Prepared but not committed numbers (a crash between prepare and commit)."""
        return self._scan(PREP_RE)

    def discard_prepared(self, seq: int) -> None:
        """Drop a prepared segment (the recorder will redo it)."""
        # Durability: the blob goes first; a stray sidecar left by a crash is harmless.
        durable_unlink(self.prep_path(seq))
        if not self.seg_path(seq).exists():
            durable_unlink(self.sidecar_path(seq))

    # -- reader side (uplink) -------------------------------------------------------------------

    def pending(self) -> list[int]:
        """Committed, unacknowledged segment numbers, oldest first."""
        return self._scan(SEG_RE)

    def read(self, seq: int) -> bytes:
        """The committed blob; FileNotFoundError (naming the file) once it is acknowledged."""
        return self.seg_path(seq).read_bytes()

    def sha256_of(self, seq: int) -> str:
        """The payload SHA-256 given to prepare(); FileNotFoundError if it has no sidecar."""
        path = self.sidecar_path(seq)
        text = path.read_text().strip()
        if not SHA_RE.match(text):
            raise FormatError(f"{path} does not hold 64 lowercase hex digits")
        return text

    def acknowledge(self, seq: int, sha256: str) -> bool:
        """Delete a segment central durably stored; False (file kept) unless the SHA matches."""
        _check_seq(seq)
        with self._lock:
            seg = self.seg_path(seq)
            if not seg.exists():
                return False
            try:
                if self.sha256_of(seq) != sha256:
                    return False
            except (OSError, FormatError):
                return False
            self._record_acked(seq)
            # Durability: the segment is gone for good once acknowledged (no resend after a
            # power cut); the sidecar goes last so a pending segment always has its SHA-256.
            durable_unlink(seg)
            durable_unlink(self.sidecar_path(seq))
            return True

    def reject(self, seq: int, reason: str) -> None:
        """Move a segment central refused to ``rejected/`` with its reason (never deleted)."""
        with self._lock:
            seg = self.seg_path(seq)
            if not seg.exists():
                raise OutboxError(f"segment {seq} is not pending in {self.path}")
            try:
                sha: str | None = self.sha256_of(seq)
            except (OSError, FormatError):
                sha = None
            # Durability: the reason is on disk before the segment moves beside it.
            atomic_write_json(self.rejected_dir / f"{seg.name}.reason.json",
                              {"seq": seq, "sha256": sha, "reason": reason, "ts": time.time()})
            os.rename(seg, self.rejected_dir / seg.name)
            # Durability: the move is complete on disk (both folders) before we forget it.
            fsync_dir(self.rejected_dir)
            fsync_dir(self.path)
            durable_unlink(self.sidecar_path(seq))

    def rejected(self) -> list[int]:
        return self._scan(SEG_RE, self.rejected_dir)

    def backlog(self) -> Backlog:
        count, total, oldest = 0, 0, None
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not SEG_RE.match(entry.name):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # acknowledged while we looked
                count += 1
                total += st.st_size
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return Backlog(segments=count, bytes=total, oldest_age_s=age)

    # -- numbering ---------------------------------------------------------------------------

    def highest_acked(self) -> int | None:
        path = self.path / ACKED_FILE
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FormatError(f"{path} is not JSON: {err}") from err
        value = obj.get("highest_acked") if isinstance(obj, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"{path} must be {{\"highest_acked\": N}} with N >= 0, got {obj!r}")
        return value

    def _record_acked(self, seq: int) -> None:
        current = self.highest_acked()
        if current is None or seq > current:
            # Durability: the highest acknowledged number survives the segment's deletion, so
            # a restarted recorder never reuses a number even when the outbox has drained.
            atomic_write_json(self.path / ACKED_FILE, {"highest_acked": seq})

    def highest_seq(self) -> int | None:
        """The highest number ever handed to the outbox (committed, prepared, acked, rejected)."""
        candidates = [*self.pending(), *self.prepared(), *self.rejected()]
        acked = self.highest_acked()
        if acked is not None:
            candidates.append(acked)
        return max(candidates) if candidates else None

    def remove_stray_sidecars(self) -> list[int]:
        """Delete sidecars of numbers already acknowledged that have no blob (crash leftovers)."""
        acked = self.highest_acked()
        if acked is None:
            return []
        live = set(self.pending()) | set(self.prepared())
        stray = [s for s in self._scan(SIDECAR_RE) if s <= acked and s not in live]
        for seq in stray:
            durable_unlink(self.sidecar_path(seq))
        return stray
