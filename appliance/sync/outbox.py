"""The durable outbox: sealed segments waiting for central's acknowledgement.

One folder, shared by two processes: the recorder adds segments, the uplink sends and removes
them. The blobs are opaque here (wire-format sealed segments from ``linerec_contract``); the
outbox only knows each one's sequence number and the SHA-256 of its payload, which central
echoes in its ack. Files::

    seg-<seq:012d>.sha256     payload SHA-256 (hex, one line); written first, by prepare()
    .seg-<seq:012d>.prep      a prepared blob, not yet visible to readers
    seg-<seq:012d>.seg        a committed blob: pending until acknowledged
    acked.json                {"highest_acked": N}: a number is never reused, even once drained
    losses.json               segments dropped by the disk-full policy, until a sealed manifest
                              has announced them (see pending_losses / clear_losses)
    .lock                     flock serialising quota decisions between recorder and uplink
    rejected/                 segments central refused, with a .reason.json each; never deleted

Two-phase publish: ``prepare`` makes the blob durable under a hidden name, ``commit`` makes it
visible with one rename. The sidecar holding the SHA-256 is durable before the prepared blob
exists, so a committed segment always has its SHA-256. A crash leaves at worst a prepared blob
(the recorder decides, on restart, to commit or discard it) or a stray sidecar (harmless,
overwritten by the next prepare of that number, removed once its number is acknowledged).

Quota and disk-full policy: the outbox may hold at most ``max_bytes`` (committed, prepared and
rejected blobs), and the file system must keep ``reserve_bytes`` free. When space runs short the
outbox first deletes what is already acknowledged (acknowledged blobs are deleted at once, so
only stray SHA-256 sidecars can be left), then applies the policy:

* ``stop-new-calls``: :meth:`Outbox.accepting_new_calls` turns False once 90 % of the quota is
  used (the rest lets calls in progress finish); nothing already recorded is deleted.
* ``drop-oldest``: the oldest unsent segments are deleted until the new one fits. Each loss is
  written to ``losses.json`` *before* the data goes, so a loss is never silent: the recorder
  puts :meth:`Outbox.pending_losses` into the ``gaps`` of the next sealed manifest and then
  calls :meth:`Outbox.clear_losses`; the uplink announces them on ``rec/v1/<dev>/event``.

Both raise alarms (:meth:`Outbox.alarms`), which the uplink writes into its status file and logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from linerec_contract.durable import (
    atomic_write,
    atomic_write_json,
    durable_unlink,
    ensure_dir,
    fsync_dir,
)
from linerec_contract.errors import ApplianceError, FormatError, StateDirError
from linerec_contract.manifest import MAX_SEQ

SEG_RE = re.compile(r"^seg-(\d{12})\.seg$")
PREP_RE = re.compile(r"^\.seg-(\d{12})\.prep$")
SIDECAR_RE = re.compile(r"^seg-(\d{12})\.sha256$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
ACKED_FILE = "acked.json"
LOSSES_FILE = "losses.json"
LOCK_FILE = ".lock"
REJECTED_DIR = "rejected"
DISK_RESERVE_BYTES = 32 * 1024 * 1024
NEW_CALLS_STOP_FRACTION = 0.9
DiskFullPolicy = Literal["stop-new-calls", "drop-oldest"]
DISK_FULL_POLICIES: tuple[str, ...] = ("stop-new-calls", "drop-oldest")


def outbox_for(cfg: Any) -> Outbox:
    """The box's outbox with the quota and disk-full policy of ``cfg.uplink`` (a Config)."""
    quota_mb = float(cfg.uplink.outbox_max_mb)
    return Outbox(cfg.outbox_dir, max_bytes=int(quota_mb * 1024 * 1024) if quota_mb else None,
                  policy=cfg.uplink.disk_full_policy)


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

    def __init__(self, path: Path, *, max_bytes: int | None = None,
                 policy: DiskFullPolicy = "stop-new-calls",
                 reserve_bytes: int = DISK_RESERVE_BYTES) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise FormatError(f"outbox quota {max_bytes!r} is invalid (bytes > 0, or None)")
        if policy not in DISK_FULL_POLICIES:
            raise FormatError(f"disk-full policy {policy!r} is invalid "
                              f"(one of {', '.join(DISK_FULL_POLICIES)})")
        self.path = path
        self.max_bytes = max_bytes
        self.policy = policy
        self.reserve_bytes = reserve_bytes
        self.rejected_dir = path / REJECTED_DIR
        try:
            ensure_dir(self.rejected_dir)
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
        dropped = self._load_losses()["highest_dropped"]
        if dropped is not None and seq <= dropped:
            raise OutboxError(f"segment {seq} is at or below a dropped number ({dropped}); "
                              f"a segment number is never reused, use highest_seq() + 1")
        self.make_room(len(blob))
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
        # 0600: the clear manifest is call metadata (line, call id, times).
        atomic_write(self.prep_path(seq), blob, mode=0o600)

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
        known = (self.highest_acked(), self._load_losses()["highest_dropped"])
        candidates.extend(k for k in known if k is not None)
        return max(candidates) if candidates else None

    def remove_stray_sidecars(self) -> list[int]:
        """Delete sidecars of numbers already acknowledged that have no blob (crash leftovers)."""
        with self._quota_lock():
            return self._remove_stray_sidecars_locked()

    def _remove_stray_sidecars_locked(self) -> list[int]:
        acked = self.highest_acked()
        if acked is None:
            return []
        live = set(self.pending()) | set(self.prepared())
        stray = [s for s in self._scan(SIDECAR_RE) if s <= acked and s not in live]
        for seq in stray:
            durable_unlink(self.sidecar_path(seq))
        return stray

    # -- quota and disk-full policy -------------------------------------------------------------

    @contextlib.contextmanager
    def _quota_lock(self) -> Iterator[None]:
        """Serialise quota decisions and losses.json across the recorder and uplink processes."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                yield
        finally:
            os.close(fd)

    def usage_bytes(self) -> int:
        """Bytes held: committed, prepared and rejected blobs (sidecars are noise)."""
        total = 0
        for folder, pattern in ((self.path, SEG_RE), (self.path, PREP_RE),
                                (self.rejected_dir, SEG_RE)):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if pattern.match(entry.name):
                        with contextlib.suppress(FileNotFoundError):
                            total += entry.stat().st_size
        return total

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def shortage(self, incoming: int = 0) -> int:
        """Bytes that must go before ``incoming`` more fit (quota and disk reserve); 0 if none."""
        short = max(0, self.reserve_bytes + incoming - self.free_bytes())
        if self.max_bytes is not None:
            short = max(short, self.usage_bytes() + incoming - self.max_bytes)
        return short

    def accepting_new_calls(self) -> bool:
        """False while space is short: under ``stop-new-calls`` the recorder starts no new call.

        Under ``drop-oldest`` this is False only when even dropping cannot help (the disk is
        short of its reserve with no unsent segment left to drop).
        """
        if self.policy == "drop-oldest":
            return self.shortage() == 0 or bool(self.pending())
        if self.max_bytes is not None and \
                self.usage_bytes() >= NEW_CALLS_STOP_FRACTION * self.max_bytes:
            return False
        return self.shortage() == 0

    def make_room(self, incoming: int = 0) -> list[int]:
        """Free space for ``incoming`` bytes: acknowledged leftovers first, then the policy.

        Returns the numbers dropped (always empty under ``stop-new-calls``, which never deletes).
        """
        if self.shortage(incoming) == 0:
            return []
        with self._quota_lock():
            # Acknowledged data goes first. Acknowledged blobs are deleted as the ack arrives,
            # so what can be left is only sidecars of acknowledged numbers (a crash mid-ack).
            self._remove_stray_sidecars_locked()
            if self.policy != "drop-oldest":
                return []
            dropped: list[int] = []
            short = self.shortage(incoming)
            for seq in self.pending():
                if short <= 0:
                    break
                try:
                    size = self.seg_path(seq).stat().st_size
                except FileNotFoundError:
                    continue  # acknowledged meanwhile
                # Durability: the loss is on disk before the data goes, so a power cut can
                # leave a loss note for a segment still here but never a silent loss.
                self._record_loss_locked(seq, "outbox full: oldest unsent segment dropped "
                                              "(disk_full_policy drop-oldest)")
                durable_unlink(self.seg_path(seq))
                durable_unlink(self.sidecar_path(seq))
                dropped.append(seq)
                short -= size
            return dropped

    def _load_losses(self) -> dict[str, Any]:
        path = self.path / LOSSES_FILE
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            return {"losses": [], "highest_dropped": None}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FormatError(f"{path} is not JSON: {err}") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("losses"), list):
            raise FormatError(f"{path} must be {{\"losses\": [...], \"highest_dropped\": N}}")
        return obj

    def _record_loss_locked(self, seq: int, reason: str) -> None:
        state = self._load_losses()
        losses: list[dict[str, Any]] = state["losses"]
        last = losses[-1] if losses else None
        if last is not None and last["lost_seq"][1] == seq - 1 and last["reason"] == reason:
            last["lost_seq"][1] = seq
        else:
            losses.append({"lost_seq": [seq, seq], "reason": reason, "ts": time.time()})
        highest = state.get("highest_dropped")
        state["highest_dropped"] = seq if highest is None else max(highest, seq)
        # Durability: fsynced and renamed before the segment is deleted (see make_room).
        atomic_write_json(self.path / LOSSES_FILE, state)

    def pending_losses(self) -> list[dict[str, Any]]:
        """Losses not yet announced in a sealed manifest, as ``gaps`` records of the seal format:
        ``{"lost_seq": [first, last], "reason": "..."}``, oldest first."""
        with self._lock:
            return [{"lost_seq": list(loss["lost_seq"]), "reason": loss["reason"]}
                    for loss in self._load_losses()["losses"]]

    def clear_losses(self, upto_seq: int) -> None:
        """Forget losses whose last number is <= ``upto_seq`` (announced by a committed segment)."""
        _check_seq(upto_seq)
        with self._quota_lock():
            state = self._load_losses()
            kept = [loss for loss in state["losses"] if loss["lost_seq"][1] > upto_seq]
            if len(kept) != len(state["losses"]):
                state["losses"] = kept
                # Durability: once cleared the loss is announced in a committed manifest.
                atomic_write_json(self.path / LOSSES_FILE, state)

    def alarms(self) -> list[dict[str, Any]]:
        """Current alarms of the outbox: space short, new calls stopped, segments dropped."""
        out: list[dict[str, Any]] = []
        usage, free = self.usage_bytes(), self.free_bytes()
        if self.max_bytes is not None and usage >= NEW_CALLS_STOP_FRACTION * self.max_bytes:
            out.append({"alarm": "outbox-quota",
                        "detail": f"outbox holds {usage} of {self.max_bytes} bytes "
                                  f"(policy {self.policy})"})
        if free < self.reserve_bytes:
            out.append({"alarm": "disk-low",
                        "detail": f"{free} bytes free, below the reserve of {self.reserve_bytes}"})
        if not self.accepting_new_calls():
            out.append({"alarm": "new-calls-stopped",
                        "detail": "outbox space is short: the recorder starts no new call"})
        for loss in self.pending_losses():
            first, last = loss["lost_seq"]
            out.append({"alarm": "segments-dropped",
                        "detail": f"segments {first}..{last} dropped: {loss['reason']}"})
        return out
