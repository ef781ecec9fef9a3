"""The fleet service: records every box's status, telemetry, events, command results and
reported config in the fleet store (``appliance-central fleet serve``).

One MQTT v5 connection with the ``central-fleet`` certificate, plain (not shared) QoS 1
subscriptions to the fleet topics of every box, in a persistent session (clean start off,
expiry :data:`SESSION_EXPIRY_S`): what the boxes send with QoS 1 while the service is down or
reconnecting (events, command results, reports) waits at the broker for it. Each message is
parsed completely and bounded (64 KiB) before it touches the store; the device is the one in the
topic (the broker lets a box write only its own subtree), and a message that claims another
device or does not parse is counted and ignored, logged at most once a minute per device.

Liveness: every message of a box counts as a sign of life (:meth:`FleetStore.touch`), and a sweep
every :data:`SWEEP_S` records offline the boxes that fell silent for half their declared
keep-alive (:meth:`FleetStore.mark_silent`); a box that disconnects is recorded offline by its
last will as soon as the broker publishes it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import asdict
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from central.fleet.link import BrokerAddress, OperatorCert
from central.fleet.store import FleetStore
from linerec_contract.errors import FormatError
from linerec_contract.fleet_protocol import (
    FLEET_SUBSCRIPTIONS,
    CommandResult,
    ReportedConfig,
    load_message,
    parse_fleet_topic,
)
from linerec_contract.protocol import Status

log = logging.getLogger("central.fleet")

LOG_EVERY_S = 60.0
# Per box: a healthy box sends a status per connection, telemetry every interval (>= 1 s) and a
# few events; more than RATE_PER_S messages a second (bursts of RATE_BURST) are dropped and
# counted, so one box cannot keep the fleet service busy for the others.
RATE_PER_S = 5.0
RATE_BURST = 50.0
SESSION_EXPIRY_S = 3600  # the broker keeps the service's QoS 1 messages this long while it is away
SWEEP_S = 0.5  # how often silent boxes are looked for; far below any keep-alive (>= 5 s)


class _Allowance:
    """A per-box message budget (token bucket)."""

    def __init__(self) -> None:
        self.tokens = RATE_BURST
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(RATE_BURST, self.tokens + (now - self.at) * RATE_PER_S)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class FleetService:
    def __init__(self, store: FleetStore, address: BrokerAddress, tls: ssl.SSLContext, *,
                 keepalive_s: int = 30, cert: OperatorCert | None = None) -> None:
        self.store = store
        self.address = address
        self.tls = tls
        self.keepalive_s = keepalive_s
        self.cert = cert  # renewed before it expires, so a reconnection presents a valid one
        self.ready = threading.Event()
        self.counters: dict[str, int] = {"messages": 0, "ignored": 0, "stale_deaths": 0,
                                         "rate_limited": 0}
        self._last_log: dict[str, float] = {}
        self._allowance: dict[str, _Allowance] = {}
        self._lock = threading.Lock()  # paho's thread records, the sweep runs in run()'s
        # When the current subscription was granted (None: not subscribed). Silence is judged
        # only while subscribed and counted from then at the earliest.
        self._listening_since: float | None = None

    def handle(self, topic: str, payload: bytes) -> None:
        """Record one message (any thread)."""
        with self._lock:
            self._handle(topic, payload)

    def sweep(self, now: float | None = None) -> list[str]:
        """Record offline the boxes silent for half their keep-alive (any thread); nothing
        while central itself is not subscribed (it would hear no box)."""
        with self._lock:
            since = self._listening_since
            if since is None:
                return []
            silent = self.store.mark_silent(now, since=since)
        for dev in silent:
            log.warning("%s: no message for half its keep-alive: recorded offline", dev)
        return silent

    def _handle(self, topic: str, payload: bytes) -> None:
        self.counters["messages"] += 1
        try:
            dev, kind = parse_fleet_topic(topic)
            if not self._allowance.setdefault(dev, _Allowance()).take():
                self.counters["rate_limited"] += 1
                raise FormatError(f"more than {RATE_PER_S:g} messages a second from {dev}: "
                                  f"dropped")
            if kind == "status":
                status = Status.decode(payload)
                if not self.store.record_status(dev, asdict(status)):
                    self.counters["stale_deaths"] += 1
                return
            if kind == "heartbeat":
                load_message(payload, "heartbeat")
            elif kind == "telemetry":
                obj = load_message(payload, "telemetry")
                if obj.get("device", dev) != dev:
                    raise FormatError(f"telemetry claims device {obj.get('device')!r}")
                self.store.record_telemetry(dev, obj)
            elif kind == "event":
                obj = load_message(payload, "event")
                if not isinstance(obj.get("kind"), str):
                    raise FormatError("event field 'kind' must be a string")
                self.store.record_event(dev, obj)
            elif kind == "cmd/res":
                result = CommandResult.decode(payload)
                if result.device != dev:
                    raise FormatError(f"command result claims device {result.device!r}")
                self.store.record_result(dev, asdict(result))
            else:
                self.store.record_reported(dev, asdict(ReportedConfig.decode(payload)))
            if self.store.touch(dev):
                log.info("%s: heard from again on the same connection: online", dev)
        except (FormatError, ValueError) as err:
            self.counters["ignored"] += 1
            key = topic.split("/")[2] if topic.count("/") >= 2 else topic
            now = time.monotonic()
            if now - self._last_log.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
                self._last_log[key] = now
                log.warning("ignored message on %s: %s", topic, err)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the fleet service: %s", rc)
            return
        client.subscribe([(t, 1) for t in FLEET_SUBSCRIPTIONS])
        log.info("fleet service connected to %s:%d", self.address.host, self.address.port)

    def _on_subscribe(self, _c: Any, _u: Any, _m: int, rcs: list[ReasonCode], _p: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("broker refused fleet subscriptions: %s", ", ".join(map(str, rcs)))
            return
        with self._lock:
            self._listening_since = time.time()
        self.ready.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._lock:
            self._listening_since = None
        log.warning("fleet service disconnected from the broker: %s", rc)

    def run(self, stop: threading.Event) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
        client.tls_set_context(self.tls)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = lambda _c, _u, msg: self.handle(msg.topic, bytes(msg.payload))
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(self.address.host, self.address.port, keepalive=self.keepalive_s,
                             clean_start=False, properties=props)
        client.loop_start()
        try:
            while not stop.wait(SWEEP_S):
                self.sweep()
                if self.cert is not None and self.cert.due():
                    self.cert.renew()
                    log.info("renewed the fleet service's certificate (%s)", self.cert.cn)
        finally:
            client.disconnect()
            client.loop_stop()
