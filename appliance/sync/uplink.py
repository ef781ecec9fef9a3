"""The MQTT uplink: sends the outbox to central and deletes what central durably acknowledged.

The outbox is the truth, never paho's in-memory queue: a fresh paho client is made for every
connection, and after every (re)connection everything still in the outbox is sent again.
Central is idempotent (a repeat is acknowledged ``duplicate``), so a repeat costs only traffic.

Per connection: MQTT v5 over mutual TLS, client id = device id, a persistent session
(clean start off, session expiry one day) so acks queued while the box was away are delivered,
a retained last will ``Status(offline)``, a retained ``Status(online)`` with a session counter
kept in the outbox folder, a QoS 1 subscription to ``rec/v1/<dev>/ack``. Segments go out in the
configured order (oldest first by default) on ``rec/v1/<dev>/seg/<seq>`` at QoS 1, at most
``window`` waiting for their ack; one not acknowledged within ``ack_timeout_s`` is sent again
(the wait doubles per attempt, capped at 8 x ``ack_timeout_s``). A segment larger than
``chunk_bytes`` goes as several messages on the same topic with MQTT v5 user properties
(``chunk``, ``seg-sha256``, ``seg-bytes``); central acks the whole segment once stored. Every
message waits for the token bucket (``max_kbps``). Segments dropped by the disk-full policy are
announced on ``rec/v1/<dev>/event`` once per connection until a manifest has carried them.

Threads: paho's network thread only parses and queues; the thread calling :meth:`Uplink.run`
does all file work (fsyncs included). A watchdog observer wakes it when the recorder commits a
segment; a rescan every ``rescan_s`` is the safety net. Nothing polls in a tight loop.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance import __version__, sdnotify
from appliance.sync.fleet_agent import FleetAgent
from appliance.sync.outbox import Outbox
from appliance.sync.uplink_base import (
    DEFAULT_CHUNK_BYTES,
    STATUS_INTERVAL_S,
    UplinkBase,
    UploadOrder,
    boot_id,
)
from linerec_contract.durable import atomic_write_json
from linerec_contract.errors import ConfigError, FormatError
from linerec_contract.fleet_protocol import HEARTBEAT_FRACTION
from linerec_contract.protocol import (
    MAX_CONTROL_MESSAGE,
    Ack,
    ChunkInfo,
    LossEvent,
    Status,
    ack_topic,
    chunk_bounds,
    event_topic,
    segment_topic,
    status_topic,
)
from linerec_contract.tls import tls_context

log = logging.getLogger(__name__)

SESSION_FILE = "session.json"
SESSION_EXPIRY_S = 86400
DISCONNECT_WITH_WILL = 4  # MQTT v5 reason code: "disconnect, but publish the will"
MAX_ACK_BACKOFF = 8



class Link(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"  # CONNACK received, waiting for the ack subscription
    READY = "ready"  # subscribed to acks: segments flow


@dataclass
class _InFlight:
    sha256: str
    sent_at: float  # when its last message was handed to paho; inf while still being sent
    attempts: int


@dataclass
class _Partial:
    """A segment whose messages are being handed to paho, one chunk per bucket allowance."""

    seq: int
    blob: bytes
    sha256: str
    bounds: list[tuple[int, int]]
    blob_sha256: str
    retransmit: bool
    next_index: int = 0


class Uplink(UplinkBase):
    """Store-and-forward of the outbox over MQTT. Call :meth:`run` in its own thread or process."""

    def __init__(self, *, device_id: str, outbox: Outbox, host: str, port: int, ca: Path,
                 cert: Path, key: Path, status_path: Path | None = None, window: int = 8,
                 ack_timeout_s: float = 10.0, keepalive_s: int = 30,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0,
                 rescan_s: float = 5.0, max_kbps: float = 0, order: UploadOrder = "oldest",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, agent: FleetAgent | None = None) -> None:
        super().__init__(device_id=device_id, outbox=outbox, status_path=status_path,
                         window=window, ack_timeout_s=ack_timeout_s, rescan_s=rescan_s,
                         max_kbps=max_kbps, order=order, chunk_bytes=chunk_bytes)
        for name, value, low in (("keepalive_s", keepalive_s, 5),
                                 ("reconnect_min_s", reconnect_min_s, 0.01)):
            if value < low:
                raise ConfigError(f"uplink {name} = {value!r} is out of range (>= {low})")
        if reconnect_max_s < reconnect_min_s:
            raise ConfigError(f"uplink reconnect_max_s = {reconnect_max_s!r} is out of range "
                              f"(>= reconnect_min_s = {reconnect_min_s!r})")
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._tls = tls_context(ssl.Purpose.SERVER_AUTH, ca, cert, key, what="uplink")
        self._boot_id = boot_id()
        self.agent = agent  # the fleet agent shares this connection (None: segments only)

        self._acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
        self._client: mqtt.Client | None = None
        self._link = Link.DISCONNECTED
        self._lost = False
        self._ready_gen = 0
        self._session = self._load_session()
        self._pending_session = self._session

        self._inflight: dict[int, _InFlight] = {}
        self._partial: _Partial | None = None
        self._throttled = False
        self._announced: set[tuple[int, int]] = set()
        if agent is not None:
            agent.link_state = lambda: str(self._link)
            # Central judges a silent box by the keep-alive in our status (docs/protocol.md).
            agent.heartbeat_s = keepalive_s * HEARTBEAT_FRACTION

    # -- setup -------------------------------------------------------------------------------

    def _session_path(self) -> Path:
        return self.outbox.path / SESSION_FILE

    def _load_session(self) -> int:
        path = self._session_path()
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            return 0
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FormatError(f"{path} is not JSON ({err}); expected {{\"session\": N}}") from err
        value = obj.get("session") if isinstance(obj, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"{path} must be {{\"session\": N}} with N >= 0, got {obj!r}")
        return value

    def _status(self, state: str, session: int) -> Status:
        return Status(state="online" if state == "online" else "offline", version=__version__,
                      boot_id=self._boot_id, session=session, ts=time.time(),
                      config_version=self.agent.config_version() if self.agent else 0,
                      keepalive_s=self.keepalive_s if self.agent else 0)

    # -- paho callbacks (paho's network thread: no file work here except the session counter) --

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("uplink: broker %s:%d refused the connection: %s",
                        self.host, self.port, reason_code)
            with self._lock:
                self._lost = True
            self._wake.set()
            return
        session = self._pending_session
        try:
            # Durability: the counter only grows, even across power cuts, so central can tell
            # one connection of this box from the next.
            atomic_write_json(self._session_path(), {"session": session})
        except OSError as err:
            log.error("uplink: cannot record session counter in %s: %s",
                      self._session_path(), err.strerror)
        client.publish(status_topic(self.device_id), self._status("online", session).encode(),
                       qos=1, retain=True)
        # One SUBSCRIBE: acks first (segments flow once it is granted), then the agent's topics.
        extra = self.agent.subscriptions() if self.agent else []
        client.subscribe([(ack_topic(self.device_id), 1), *[(t, 1) for t in extra]])
        if self.agent is not None:
            self.agent.on_connect()
        with self._lock:
            self._session = session
            self._link = Link.CONNECTED
            self._counters["connects"] += 1
        log.info("uplink: connected to %s:%d as %s (session %d, session present: %s)",
                 self.host, self.port, self.device_id, session, flags.session_present)
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if reason_codes and reason_codes[0].is_failure:
            log.error("uplink: broker refused subscription to %s: %s; no segment will be sent",
                      ack_topic(self.device_id), reason_codes[0])
            return
        if any(rc.is_failure for rc in reason_codes[1:]):
            log.error("uplink: broker refused the fleet agent's subscriptions (%s): no commands "
                      "or pushed config will arrive", ", ".join(str(rc) for rc in reason_codes[1:]))
        with self._lock:
            self._link = Link.READY
            self._ready_gen += 1
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._lost = True
            self._link = Link.DISCONNECTED
        log.info("uplink: disconnected from %s:%d: %s", self.host, self.port, reason_code)
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.agent is not None and self.agent.handles(msg.topic):
            self.agent.on_message(msg)
            self._wake.set()
            return
        try:
            if msg.topic != ack_topic(self.device_id):
                raise FormatError(f"unexpected topic (this box only takes "
                                  f"{ack_topic(self.device_id)})")
            if len(msg.payload) > MAX_CONTROL_MESSAGE:
                raise FormatError(f"{len(msg.payload)} bytes is larger than {MAX_CONTROL_MESSAGE}")
            ack = Ack.decode(bytes(msg.payload))
        except (FormatError, ValueError, RecursionError) as err:
            with self._lock:
                self._counters["ignored_messages"] += 1
            log.warning("uplink: ignored message on %s: %s", msg.topic, err)
            return
        self._acks.put(ack)
        self._wake.set()

    # -- connection management (run thread) ------------------------------------------------------

    def _connect(self) -> bool:
        self._pending_session = self._session + 1
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id,
                             protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        client.tls_set_context(self._tls)
        client.max_inflight_messages_set(max(20, 2 * self.window))
        client.will_set(status_topic(self.device_id),
                        self._status("offline", self._pending_session).encode(), qos=1,
                        retain=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        with self._lock:
            self._link = Link.CONNECTING
            self._lost = False
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive_s, clean_start=False,
                           properties=props)
        except OSError as err:
            with self._lock:
                self._link = Link.DISCONNECTED
                self._counters["connect_failures"] += 1
            log.warning("uplink: cannot connect to %s:%d: %s", self.host, self.port, err)
            return False
        client.loop_start()
        self._client = client
        return True

    def _teardown(self, *, graceful: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if graceful and client.is_connected():
            # Ask the broker to publish our retained offline will now: one path for "gone".
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                    identifier=DISCONNECT_WITH_WILL))
        else:
            client.disconnect()
        client.loop_stop()
        with self._lock:
            self._link = Link.DISCONNECTED
            self._lost = False

    def _link_state(self) -> str:
        return str(self._link)  # called with self._lock held

    def _extra_stats(self) -> dict[str, Any]:
        return {"session": self._session, "in_flight": len(self._inflight)}

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Send and clear the outbox until ``stop`` is set; survives broker and network loss."""
        stray = self.outbox.remove_stray_sidecars()
        if stray:
            log.info("uplink: removed %d SHA-256 sidecars left by a crash after an ack", len(stray))
        observer = self._start_watcher()
        delay = self.reconnect_min_s
        next_connect = 0.0
        seen_gen = 0
        next_rescan = 0.0
        next_status = 0.0
        try:
            while not stop.is_set():
                sdnotify.notifier().watchdog()
                now = time.monotonic()
                with self._lock:
                    lost, link, gen = self._lost, self._link, self._ready_gen
                if lost:
                    self._teardown(graceful=False)
                    # Nothing is in flight on a dead link; all of it goes again on the next one.
                    self._inflight.clear()
                    self._partial = None
                    next_connect = now + self._backoff(delay)
                    delay = min(delay * 2, self.reconnect_max_s)
                elif self._client is None and now >= next_connect:
                    if not self._connect():
                        next_connect = time.monotonic() + self._backoff(delay)
                        delay = min(delay * 2, self.reconnect_max_s)
                self._process_acks()
                if link is Link.READY and gen != seen_gen:
                    # A new connection: nothing is in flight until the outbox says so.
                    seen_gen = gen
                    delay = self.reconnect_min_s
                    self._inflight.clear()
                    self._partial = None
                    self._skipped.clear()
                    self._announced.clear()
                    self._dirty.set()
                if self._dirty.is_set() or now >= next_rescan:
                    self._dirty.clear()
                    self._rescan()
                    next_rescan = now + self.rescan_s
                if self.agent is not None:
                    self.agent.observe()  # alarms, link up or not
                if link is Link.READY and self._client is not None and not lost:
                    self._announce_losses(self._client)
                    self._send(self._client)
                    if self.agent is not None:
                        self.agent.tick(self._client)
                        if self.agent.take_status_dirty():
                            self._client.publish(
                                status_topic(self.device_id),
                                self._status("online", self._session).encode(), qos=1,
                                retain=True)
                if now >= next_status:
                    self._housekeeping()
                    self._write_status()
                    next_status = now + STATUS_INTERVAL_S
                self._wake.wait(self._sleep_time(next_connect, next_rescan, next_status,
                                                 sending=link is Link.READY))
                self._wake.clear()
        finally:
            self._teardown(graceful=True)
            if observer is not None:
                observer.stop()
                observer.join()
            self._write_status()

    def _sleep_time(self, next_connect: float, next_rescan: float, next_status: float, *,
                    sending: bool) -> float:
        now = time.monotonic()
        deadlines = [next_rescan, next_status]
        if self.agent is not None:
            deadlines.append(self.agent.next_observe())
        if sending and self.agent is not None:
            deadlines.append(self.agent.next_deadline())
        if self._client is None:
            deadlines.append(next_connect)
        if sending:
            deadlines += [f.sent_at + self._ack_wait(f) for f in self._inflight.values()
                          if math.isfinite(f.sent_at)]
            if self._throttled:
                deadlines.append(now + self.bucket.wait_time())
        return max(0.005, float(min(deadlines)) - now)

    def _ack_wait(self, flight: _InFlight) -> float:
        factor: int = min(1 << max(0, flight.attempts - 1), MAX_ACK_BACKOFF)
        return self.ack_timeout_s * factor

    def _announce_losses(self, client: mqtt.Client) -> None:
        """Publish each pending loss once per connection on the event topic (QoS 1)."""
        try:
            losses = self.outbox.pending_losses()
        except (OSError, FormatError) as err:
            log.error("uplink: cannot read the outbox's losses: %s", err)
            return
        for loss in losses:
            first, last = loss["lost_seq"]
            if (first, last) in self._announced:
                continue
            event = LossEvent(first_seq=first, last_seq=last, reason=loss["reason"],
                              ts=time.time())
            info = client.publish(event_topic(self.device_id), event.encode(), qos=1)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._announced.add((first, last))

    def _send(self, client: mqtt.Client) -> None:
        self._throttled = False
        if self._partial is not None and not self._continue(client):
            return
        now = time.monotonic()
        for seq, flight in sorted(self._inflight.items()):
            if now - flight.sent_at >= self._ack_wait(flight):
                log.info("uplink: segment %d not acknowledged after %.1f s, sending again",
                         seq, now - flight.sent_at)
                if not self._publish(client, seq, retransmit=True):
                    return
        for seq in self._pending:
            if len(self._inflight) >= self.window:
                return
            if seq in self._inflight or seq in self._skipped:
                continue
            if not self._publish(client, seq, retransmit=False):
                return

    def _publish(self, client: mqtt.Client, seq: int, *, retransmit: bool) -> bool:
        """Start sending one segment; False when the link cannot take more right now."""
        try:
            sha = self.outbox.sha256_of(seq)
            blob = self.outbox.read(seq)
        except (OSError, FormatError) as err:
            # Gone (acknowledged, rejected or dropped meanwhile) or unusable: never deleted here.
            self._inflight.pop(seq, None)
            if self.outbox.seg_path(seq).exists():
                self._skipped.add(seq)
                log.error("uplink: segment %d cannot be sent and stays in the outbox: %s",
                          seq, err)
            return True
        bounds = chunk_bounds(len(blob), self.chunk_bytes)
        blob_sha = hashlib.sha256(blob).hexdigest() if len(bounds) > 1 else ""
        attempts = self._inflight[seq].attempts + 1 if seq in self._inflight else 1
        self._inflight[seq] = _InFlight(sha256=sha, sent_at=math.inf, attempts=attempts)
        self._partial = _Partial(seq=seq, blob=blob, sha256=sha, bounds=bounds,
                                 blob_sha256=blob_sha, retransmit=retransmit)
        return self._continue(client)

    def _continue(self, client: mqtt.Client) -> bool:
        """Hand the next messages of the partial segment to paho, as the bucket allows."""
        part = self._partial
        assert part is not None
        count = len(part.bounds)
        while part.next_index < count:
            if self.bucket.wait_time() > 0:
                self._throttled = True
                return False
            start, end = part.bounds[part.next_index]
            props: Properties | None = None
            if count > 1:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = ChunkInfo(
                    index=part.next_index, count=count, blob_sha256=part.blob_sha256,
                    blob_bytes=len(part.blob)).user_properties()
            try:
                info = client.publish(segment_topic(self.device_id, part.seq),
                                      part.blob[start:end], qos=1, properties=props)
            except ValueError as err:
                self._skipped.add(part.seq)
                self._inflight.pop(part.seq, None)
                self._partial = None
                log.error("uplink: segment %d of %d bytes cannot be published and stays in "
                          "the outbox: %s", part.seq, len(part.blob), err)
                return True
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.info("uplink: publish of segment %d failed (%s); waiting for the link",
                         part.seq, mqtt.error_string(info.rc))
                return False
            self.bucket.take(end - start)
            with self._lock:
                self._counters["bytes_sent"] += end - start
            part.next_index += 1
        flight = self._inflight.get(part.seq)
        if flight is not None:
            flight.sent_at = time.monotonic()
        with self._lock:
            self._counters["retransmitted" if part.retransmit else "published"] += 1
        self._partial = None
        return True

    def _process_acks(self) -> None:
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                return
            if self._apply_ack(ack):
                self._inflight.pop(ack.seq, None)
