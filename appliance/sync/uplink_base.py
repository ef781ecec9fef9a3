"""What the MQTT and the HTTPS uplink share: the outbox view, acks, the bandwidth cap, status.

An uplink reads the outbox (the truth), sends segments in the configured order, applies
central's acks (delete only on ``stored``/``duplicate`` naming the SHA-256 the outbox holds,
move to ``rejected/`` on ``rejected``), keeps the outbox within its quota (see
:mod:`appliance.sync.outbox`), and publishes its state to a status file every second.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from appliance.sync.outbox import SEG_RE, Outbox
from appliance.sync.ratelimit import TokenBucket
from linerec_contract.durable import write_status
from linerec_contract.errors import ConfigError, FormatError
from linerec_contract.protocol import DEVICE_ID_RE, Ack

log = logging.getLogger("appliance.sync.uplink")

STATUS_INTERVAL_S = 1.0
UploadOrder = Literal["oldest", "newest"]
DEFAULT_CHUNK_BYTES = 256 * 1024


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class OutboxWatcher(FileSystemEventHandler):
    """Wakes the uplink when a committed segment appears (or disappears) in the outbox."""

    def __init__(self, on_change: threading.Event, dirty: threading.Event) -> None:
        self._wake = on_change
        self._dirty = dirty

    def on_any_event(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, event.dest_path):
            name = os.path.basename(os.fsdecode(raw)) if raw else ""
            if SEG_RE.match(name):
                self._dirty.set()
                self._wake.set()
                return


class UplinkBase:
    """State and behaviour common to both transports; subclasses implement ``run``."""

    def __init__(self, *, device_id: str, outbox: Outbox, status_path: Path | None,
                 window: int, ack_timeout_s: float, rescan_s: float, max_kbps: float,
                 order: UploadOrder, chunk_bytes: int) -> None:
        if not DEVICE_ID_RE.match(device_id):
            raise ConfigError(f"device_id {device_id!r} is invalid "
                              f"(letters, digits, '_.-', max 63, starting alphanumeric)")
        for name, value, low in (("window", window, 1), ("ack_timeout_s", ack_timeout_s, 0.01),
                                 ("rescan_s", rescan_s, 0.1), ("max_kbps", max_kbps, 0),
                                 ("chunk_bytes", chunk_bytes, 1024)):
            if value < low:
                raise ConfigError(f"uplink {name} = {value!r} is out of range (>= {low})")
        if order not in ("oldest", "newest"):
            raise ConfigError(f"uplink order = {order!r} is invalid (oldest or newest)")
        self.device_id = device_id
        self.outbox = outbox
        self.status_path = status_path
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.rescan_s = rescan_s
        self.order = order
        self.chunk_bytes = chunk_bytes
        self.bucket = TokenBucket(max_kbps, burst_bytes=chunk_bytes)
        self._rng = secrets.SystemRandom()
        self._lock = threading.Lock()  # guards counters and fields shared with other threads
        self._wake = threading.Event()
        self._dirty = threading.Event()
        self._pending: list[int] = []
        self._skipped: set[int] = set()
        self._counters = {"published": 0, "retransmitted": 0, "acked": 0, "rejected": 0,
                          "ignored_messages": 0, "ack_mismatch": 0, "connects": 0,
                          "connect_failures": 0, "dropped": 0, "bytes_sent": 0}
        self._last_ack_ts: float | None = None
        self._alarms: list[dict[str, Any]] = []
        self._link_text = "disconnected"

    # -- outbox view -------------------------------------------------------------------------

    def _rescan(self) -> None:
        pending = self.outbox.pending()
        if self.order == "newest":
            pending.reverse()
        self._pending = pending

    def _start_watcher(self) -> Any:
        observer = Observer()
        observer.schedule(OutboxWatcher(self._wake, self._dirty), str(self.outbox.path),
                          recursive=False)
        try:
            observer.start()
        except OSError as err:
            log.warning("uplink: cannot watch %s (%s); relying on the %.0f s rescan",
                        self.outbox.path, err, self.rescan_s)
            return None
        return observer

    def _backoff(self, delay: float) -> float:
        return self._rng.uniform(delay / 2, delay)

    # -- acks --------------------------------------------------------------------------------

    def _apply_ack(self, ack: Ack) -> bool:
        """Apply one ack to the outbox; True when the segment left the outbox."""
        seq = ack.seq
        try:
            held = self.outbox.sha256_of(seq) if self.outbox.seg_path(seq).exists() else None
        except (OSError, FormatError):
            held = None
        if held is None:
            log.debug("uplink: %s ack for segment %d which is no longer pending", ack.result, seq)
            return True
        if held != ack.sha256:
            with self._lock:
                self._counters["ack_mismatch"] += 1
            log.warning("uplink: %s ack for segment %d names sha256 %s but the outbox holds %s; "
                        "kept", ack.result, seq, ack.sha256[:16], held[:16])
            return False
        if ack.result == "rejected":
            self.outbox.reject(seq, ack.reason)
            self._dirty.set()
            with self._lock:
                self._counters["rejected"] += 1
            log.error("uplink: central rejected segment %d (%s); moved to %s",
                      seq, ack.reason or "no reason given", self.outbox.rejected_dir)
            return True
        if self.outbox.acknowledge(seq, ack.sha256):
            self._dirty.set()
            with self._lock:
                self._counters["acked"] += 1
                self._last_ack_ts = time.time()
            return True
        return not self.outbox.seg_path(seq).exists()

    # -- quota, alarms and status ------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Keep the outbox within its quota and refresh the alarms (logged when they change)."""
        try:
            dropped = self.outbox.make_room(0)
            alarms = self.outbox.alarms()
        except (OSError, FormatError) as err:
            log.error("uplink: cannot check the outbox quota in %s: %s", self.outbox.path, err)
            return
        if dropped:
            log.error("uplink: outbox over quota: dropped unsent segments %d..%d (%s)",
                      dropped[0], dropped[-1], self.outbox.policy)
            self._dirty.set()
        with self._lock:
            self._counters["dropped"] += len(dropped)
            before = {a["alarm"] for a in self._alarms}
            self._alarms = alarms
        for alarm in alarms:
            if alarm["alarm"] not in before:
                log.error("uplink: ALARM %s: %s", alarm["alarm"], alarm["detail"])
        for name in before - {a["alarm"] for a in alarms}:
            log.warning("uplink: alarm %s cleared", name)

    def _link_state(self) -> str:
        return self._link_text

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def stats(self) -> dict[str, Any]:
        """Link state, backlog, alarms and counters (also written to ``status_path``)."""
        backlog = self.outbox.backlog()
        with self._lock:
            out: dict[str, Any] = {
                "device_id": self.device_id,
                "link": self._link_state(),
                "backlog": {"segments": backlog.segments, "bytes": backlog.bytes,
                            "oldest_age_s": round(backlog.oldest_age_s, 3)},
                "last_ack_ts": self._last_ack_ts,
                "alarms": list(self._alarms),
                "order": self.order,
                "max_kbps": self.bucket.rate * 8 / 1000,
                "ts": time.time(),
            }
            out.update(self._counters)
        out.update(self._extra_stats())
        return out

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            write_status(self.status_path, self.stats())
        except OSError as err:
            log.warning("uplink: cannot write status %s: %s", self.status_path, err.strerror)
