"""The central receiver: takes sealed segments off MQTT, verifies, stores, indexes, then acks.

One message, in order: parse the topic, decode the wire form, check the topic matches the
manifest, look up the enrolled device key, verify signature and payload hash, check the chain
link against the stored neighbours, store durably (fsync), index, and only then publish
``Ack`` on ``rec/v1/<dev>/ack`` and release the MQTT message (manual PUBACK). A receiver
killed at any point before the ack leaves the message with the broker, which redelivers it;
the store answers "duplicate" for a segment it already holds.

The ``sha256`` of an Ack is the SHA-256 of the payload bytes central received (the box's
outbox compares it with the payload hash it holds, so an ack for bytes damaged in transit
never deletes or rejects the box's good copy); for a message that does not decode at all it
is the SHA-256 of the raw message.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.errors import FormatError, VerificationError
from appliance.seal import SealedSegment, decode_wire, verify_segment
from appliance.sync.protocol import (
    SEGMENT_SUBSCRIPTION,
    Ack,
    ack_topic,
    parse_segment_topic,
    shared,
)
from central.home import Home
from central.index import Index, IndexDbError
from central.store import SegmentConflict, Store, StoreError

log = logging.getLogger("central.receiver")

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue a week while we are down
RETRY_AFTER_STORAGE_ERROR_S = 5.0


class Rejected(Exception):  # noqa: N818 - a result, not a failure of the receiver
    """A segment refused for a reason the box must hear about (it is quarantined)."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: the ack to send (None if no device to answer)."""

    ack: Ack | None
    device: str | None
    detail: str


class Receiver:
    """Consumes ``$share/<group>/rec/v1/+/seg/+`` for one central home."""

    def __init__(
        self,
        home: Home,
        *,
        host: str,
        port: int,
        ca: Path,
        cert: Path,
        key: Path,
        group: str = "central",
        client_id: str | None = None,
    ) -> None:
        self.home = home
        self.host, self.port = host, port
        self.ca, self.cert, self.key = ca, cert, key
        self.group = group
        self.client_id = client_id or f"central-{group}-{socket.gethostname()}"
        self.store = Store(home)
        self.index: Index | None = None
        self.ready = threading.Event()  # set once subscribed (tests, the demo)
        self.counts = {"stored": 0, "duplicate": 0, "rejected": 0, "unanswered": 0}
        self._storage_failed = threading.Event()

    # -- the verification pipeline (no MQTT here; tests call it directly too) --------------

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Verify, store and index one message; returns the ack to publish. Never raises
        for a bad message; raises OSError/StoreError/IndexDbError when central cannot write."""
        try:
            dev, seq = parse_segment_topic(topic)
        except FormatError as err:
            where = self.store.quarantine(None, None, payload, f"bad topic {topic!r}: {err}")
            return Outcome(None, None, f"bad topic {topic!r}, quarantined in {where}")
        try:
            seg = self._accept(dev, seq, payload)
        except Rejected as err:
            return self._reject(dev, seq, payload, str(err))
        try:
            result = self.store.put(seg)
        except SegmentConflict as err:
            return Outcome(
                Ack(seq, seg.payload_sha256, "rejected", str(err)), dev, f"rejected: {err}"
            )
        nxt = seg.manifest.get("next_signing_key")
        if isinstance(nxt, dict):  # a verified rotation announcement: trust it for later seqs
            self.home.trust_announced_key(dev, str(nxt["key_id"]), str(nxt["public_b64"]), seq)
        ref = self.store.ref(dev, seq)
        if self.index is None:
            self.index = Index(self.home.index_path, check_same_thread=False)
        self.index.add(seg, ref)
        detail = (
            f"{result} line={seg.manifest.get('line')} call={seg.manifest.get('call_id')} "
            f"part={seg.manifest.get('part')} frames={seg.manifest.get('frames')}"
        )
        return Outcome(Ack(seq, seg.payload_sha256, result), dev, detail)

    def _reject(self, dev: str, seq: int, payload: bytes, reason: str) -> Outcome:
        where = self.store.quarantine(dev, seq, payload, reason)
        try:
            sha = str(decode_wire(payload).payload_sha256)
        except FormatError:
            sha = hashlib.sha256(payload).hexdigest()
        ack = Ack(seq, sha, "rejected", reason)
        return Outcome(ack, dev, f"rejected: {reason} (quarantined in {where})")

    def _reject_after_bug(self, topic: str, payload: bytes, err: Exception) -> Outcome | None:
        """Quarantine a message that hit a receiver bug, so it cannot block the queue."""
        try:
            dev, seq = parse_segment_topic(topic)
            return self._reject(dev, seq, payload, f"internal error at central: {err!r}")
        except (FormatError, OSError):
            return None

    def _accept(self, dev: str, seq: int, payload: bytes) -> SealedSegment:
        """The decoded, verified segment, or :class:`Rejected` with a one-line reason."""
        try:
            seg = decode_wire(payload)
        except FormatError as err:
            raise Rejected(f"malformed segment: {err}") from err
        if seg.device_id != dev or seg.seq != seq:
            raise Rejected(f"topic names {dev}/{seq} but the manifest is {seg.device_id}/{seg.seq}")
        device = self.home.device(dev)
        if device is None:
            raise Rejected(f"device {dev} is not enrolled at central")
        key_id = str(seg.manifest.get("signing_key_id"))
        public_b64 = device.key_for(key_id, seq)
        if public_b64 is None:
            raise Rejected(f"signing key {key_id} is not enrolled for device {dev}")
        try:
            verify_segment(seg, public_b64)
        except (VerificationError, FormatError) as err:
            raise Rejected(f"verification failed: {err}") from err
        self._check_chain(seg)
        return seg

    def _check_chain(self, seg: SealedSegment) -> None:
        """Links to stored neighbours must hold; a missing neighbour is fine (out of order)."""
        dev, seq = seg.device_id, seg.seq
        try:
            if seq > 0:
                prev = self.store.manifest_sha256(dev, seq - 1)
                claimed = seg.manifest.get("prev_manifest_sha256")
                if prev is not None and claimed != prev:
                    raise Rejected(
                        f"chain break: prev_manifest_sha256 {str(claimed)[:16]}... does not match "
                        f"stored seq {seq - 1} ({prev[:16]}...)"
                    )
            nxt_ref = self.store.ref(dev, seq + 1)
            if nxt_ref.manifest_path.exists():
                nxt = self.store.load_ref(nxt_ref)
                if nxt.manifest.get("prev_manifest_sha256") != seg.manifest_sha256:
                    raise Rejected(
                        f"chain break: stored seq {seq + 1} does not link to this segment"
                    )
        except StoreError as err:
            raise Rejected(f"cannot check the chain: {err}") from err

    # -- MQTT ------------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            # PUBACK only after the segment is fsynced: until then the broker keeps the message.
            manual_ack=True,
        )
        client.tls_set(ca_certs=str(self.ca), certfile=str(self.cert), keyfile=str(self.key))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any
    ) -> None:
        if rc.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, rc)
            return
        log.info(
            "connected to %s:%d (session present: %s)", self.host, self.port, flags.session_present
        )
        client.subscribe(shared(self.group, SEGMENT_SUBSCRIPTION), qos=1)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        if any(code.is_failure for code in codes):
            log.error("subscription to segments refused: %s", ", ".join(str(c) for c in codes))
            return
        log.info("subscribed to %s", shared(self.group, SEGMENT_SUBSCRIPTION))
        self.ready.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.ready.clear()
        log.warning("disconnected from %s:%d: %s", self.host, self.port, rc)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            outcome = self.handle(msg.topic, bytes(msg.payload))
        except (OSError, StoreError, IndexDbError) as err:
            # Not acked, not PUBACKed: the broker keeps the message; reconnect to get it again.
            log.error("cannot store %s: %s; will retry", msg.topic, err)
            self.counts["unanswered"] += 1
            self._storage_failed.set()
            return
        except Exception as err:  # noqa: BLE001 - a bug must not stall every box behind it
            log.exception("unexpected error on %s; rejecting it", msg.topic)
            fallback = self._reject_after_bug(msg.topic, bytes(msg.payload), err)
            if fallback is None:
                self._storage_failed.set()
                return
            outcome = fallback
        if outcome.ack is not None and outcome.device is not None:
            client.publish(ack_topic(outcome.device), outcome.ack.encode(), qos=1)
            self.counts[outcome.ack.result] += 1
        else:
            self.counts["unanswered"] += 1
        log.info("%s %s", msg.topic, outcome.detail)
        client.ack(msg.mid, msg.qos)

    def run(self, stop: threading.Event) -> None:
        """Receive until ``stop`` is set. Reconnects on network loss and after storage errors."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        while not stop.is_set():
            client = self._client()
            client.connect_async(
                self.host, self.port, keepalive=30, clean_start=False, properties=props
            )
            client.loop_start()
            try:
                while not stop.is_set() and not self._storage_failed.is_set():
                    stop.wait(0.2)
            finally:
                if client.is_connected():
                    client.disconnect()
                client.loop_stop()
                self.ready.clear()
            if self._storage_failed.is_set():
                self._storage_failed.clear()
                stop.wait(RETRY_AFTER_STORAGE_ERROR_S)
        if self.index is not None:
            self.index.close()
            self.index = None
