"""The HTTPS uplink: the outbox sent as idempotent ``PUT /v1/<dev>/seg/<seq>`` with mutual TLS.

Same outbox semantics as the MQTT uplink (:mod:`appliance.sync.uplink`): the outbox is the
truth; a segment leaves it only on a ``stored``/``duplicate`` Ack naming the SHA-256 it holds,
or moves to ``rejected/`` on ``rejected``. One persistent HTTP/1.1 connection, one request at a
time (the answer *is* the ack, so there is no window); the body is written in pieces, each
after the token bucket allows it. A request that fails (cut link, timeout, 503) closes the
connection, and the uplink reconnects with exponential backoff and jitter; the segment is sent
again from the outbox (central answers ``duplicate`` if it had stored it).
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance import sdnotify
from appliance.sync.outbox import Outbox
from appliance.sync.uplink_base import (
    DEFAULT_CHUNK_BYTES,
    STATUS_INTERVAL_S,
    UplinkBase,
    UploadOrder,
)
from linerec_contract.errors import ConfigError, FormatError
from linerec_contract.protocol import MAX_CONTROL_MESSAGE, Ack, https_segment_path
from linerec_contract.tls import tls_context

log = logging.getLogger(__name__)

PIECE_BYTES = 16 * 1024


class HttpsError(Exception):
    """One request failed in a way that says "try again later" (link, timeout, 5xx)."""


def parse_https_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"uplink https_url {url!r} is invalid (https://host[:port], no path)")
    return parts.hostname, parts.port or 443


class HttpsUplink(UplinkBase):
    """Store-and-forward of the outbox over HTTPS. Call :meth:`run` in its own thread."""

    def __init__(self, *, device_id: str, outbox: Outbox, host: str, port: int, ca: Path,
                 cert: Path, key: Path, status_path: Path | None = None,
                 ack_timeout_s: float = 30.0, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, rescan_s: float = 5.0, max_kbps: float = 0,
                 order: UploadOrder = "oldest", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(device_id=device_id, outbox=outbox, status_path=status_path, window=1,
                         ack_timeout_s=ack_timeout_s, rescan_s=rescan_s, max_kbps=max_kbps,
                         order=order, chunk_bytes=chunk_bytes)
        if not 0.01 <= reconnect_min_s <= reconnect_max_s:
            raise ConfigError(f"uplink reconnect_min_s = {reconnect_min_s!r} / reconnect_max_s = "
                              f"{reconnect_max_s!r} are out of range (0.01 <= min <= max)")
        self.host, self.port = host, port
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._tls = tls_context(ssl.Purpose.SERVER_AUTH, ca, cert, key, what="uplink")
        self._conn: http.client.HTTPSConnection | None = None

    def _extra_stats(self) -> dict[str, Any]:
        return {"transport": "https", "in_flight": 0}

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Send and clear the outbox until ``stop`` is set; survives central and network loss."""
        self.outbox.remove_stray_sidecars()
        observer = self._start_watcher()
        delay = self.reconnect_min_s
        next_rescan = next_status = next_try = 0.0
        try:
            while not stop.is_set():
                sdnotify.notifier().watchdog()
                now = time.monotonic()
                if now >= next_status:
                    self._housekeeping()
                    self._write_status()
                    next_status = now + STATUS_INTERVAL_S
                if self._dirty.is_set() or now >= next_rescan:
                    if now >= next_rescan:
                        self._skipped.clear()  # segments skipped after a 4xx get another try
                    self._dirty.clear()
                    self._rescan()
                    next_rescan = now + self.rescan_s
                seq = next((s for s in self._pending if s not in self._skipped), None)
                if seq is not None and now >= next_try:
                    try:
                        self._send_one(seq, stop)
                        delay = self.reconnect_min_s
                    except HttpsError as err:
                        self._close(f"{err}")
                        next_try = time.monotonic() + self._backoff(delay)
                        delay = min(delay * 2, self.reconnect_max_s)
                    continue
                deadline = min(next_rescan, next_status, next_try if seq is not None else 1e18)
                self._wake.wait(max(0.005, deadline - time.monotonic()))
                self._wake.clear()
        finally:
            self._close("stopping")
            if observer is not None:
                observer.stop()
                observer.join()
            self._write_status()

    def _close(self, why: str) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            log.info("uplink: HTTPS connection to %s:%d closed: %s", self.host, self.port, why)
        with self._lock:
            self._link_text = "disconnected"

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            with self._lock:
                self._link_text = "connecting"
            conn = http.client.HTTPSConnection(self.host, self.port, context=self._tls,
                                               timeout=self.ack_timeout_s)
            try:
                conn.connect()
            except OSError as err:
                with self._lock:
                    self._counters["connect_failures"] += 1
                raise HttpsError(f"cannot connect to {self.host}:{self.port}: {err}") from err
            with self._lock:
                self._counters["connects"] += 1
                self._link_text = "ready"
            self._conn = conn
        return self._conn

    def _send_one(self, seq: int, stop: threading.Event) -> None:
        try:
            sha = self.outbox.sha256_of(seq)
            blob = self.outbox.read(seq)
        except (OSError, FormatError) as err:
            if self.outbox.seg_path(seq).exists():
                self._skipped.add(seq)
                log.error("uplink: segment %d cannot be sent and stays in the outbox: %s",
                          seq, err)
            self._dirty.set()
            return
        conn = self._connection()
        try:
            conn.putrequest("PUT", https_segment_path(self.device_id, seq),
                            skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(blob)))
            conn.putheader("X-Payload-Sha256", sha)
            conn.endheaders()
            view = memoryview(blob)
            for start in range(0, len(blob), PIECE_BYTES):
                piece = view[start:start + PIECE_BYTES]
                if not self.bucket.consume(len(piece), stop):
                    raise HttpsError("stopping mid-upload")
                conn.send(piece)
                with self._lock:
                    self._counters["bytes_sent"] += len(piece)
            response = conn.getresponse()
            body = response.read(MAX_CONTROL_MESSAGE + 1)
        except (OSError, http.client.HTTPException) as err:
            raise HttpsError(f"PUT of segment {seq} failed: {err!r}") from err
        with self._lock:
            self._counters["published"] += 1
        if response.will_close:
            self._close("server closes the connection")
        self._answer(seq, response.status, body)

    def _answer(self, seq: int, status: int, body: bytes) -> None:
        if status >= 500:
            raise HttpsError(f"central answered {status} for segment {seq}: {body[:200]!r}")
        if status not in (200, 422):
            # 4xx: our request is wrong (a configuration problem); keep the segment, go on.
            self._skipped.add(seq)
            with self._lock:
                self._counters["ignored_messages"] += 1
            log.error("uplink: central answered %d for segment %d: %s; kept in the outbox",
                      status, seq, body[:200].decode("utf-8", "replace"))
            return
        try:
            ack = Ack.decode(body)
            if ack.seq != seq:
                raise FormatError(f"ack names segment {ack.seq}, the PUT was for {seq}")
        except (FormatError, ValueError, RecursionError) as err:
            with self._lock:
                self._counters["ignored_messages"] += 1
            log.warning("uplink: ignored answer to the PUT of segment %d: %s", seq, err)
            raise HttpsError(f"bad answer for segment {seq}") from err
        if not self._apply_ack(ack):
            self._skipped.add(seq)  # sha mismatch: kept, tried again after the next rescan
