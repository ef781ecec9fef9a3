"""Test helpers for the sync tests: a tiny fake central, MQTT clients, bounded waits.

The fake central is a stand-in for the real receiver (written elsewhere): it speaks the same
protocol (shared subscription on the segment topics, Ack on the box's ack topic) and lets a test
drop, hold or corrupt acks, which the real receiver would never do on purpose.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.sync.broker import Broker
from appliance.sync.outbox import Outbox
from linerec_contract.pki import Pki
from linerec_contract.protocol import (
    SEGMENT_SUBSCRIPTION,
    Ack,
    ack_topic,
    parse_segment_topic,
    shared,
)

WAIT_S = 30.0  # failure bound only: nothing asserts on how fast things happen


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def add_segment(outbox: Outbox, seq: int, blob: bytes) -> None:
    outbox.prepare(seq, blob, sha(blob))
    outbox.commit(seq)


class Client:
    """A paho v5 client that records what it receives and the results of its requests."""

    def __init__(self, broker: Broker, pki: Pki, user: str, client_id: str, *,
                 cert: Path | None = None, key: Path | None = None,
                 clean_start: bool = True) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.suback: dict[int, list[Any]] = {}
        self.connack: Any = None
        self.connected = threading.Event()
        self.lock = threading.Lock()
        self.on_message: Callable[[Client, mqtt.MQTTMessage], None] | None = None
        self.subscriptions: list[str] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(cert or pki.client_cert(user)), str(key or pki.client_key(user)))
        c.tls_set_context(ctx)
        c.reconnect_delay_set(0.05, 0.5)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_msg
        self.c = c
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(broker.host, broker.port, clean_start=clean_start, properties=props)
        c.loop_start()

    def _on_connect(self, c: Any, ud: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc
        if not rc.is_failure:
            for topic in self.subscriptions:
                c.subscribe(topic, qos=1)
            self.connected.set()

    def _on_subscribe(self, c: Any, ud: Any, mid: int, rcs: list[Any], props: Any) -> None:
        with self.lock:
            self.suback[mid] = rcs

    def _on_msg(self, c: Any, ud: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)
        if self.on_message is not None:
            self.on_message(self, msg)

    def wait_connected(self) -> None:
        assert self.connected.wait(WAIT_S), f"no CONNACK success (got {self.connack})"

    def subscribe(self, topic: str) -> None:
        """Subscribe (also again after every reconnection) and wait for the SUBACK."""
        self.wait_connected()
        self.subscriptions.append(topic)
        _, mid = self.c.subscribe(topic, qos=1)
        wait_until(lambda: mid in self.suback, f"SUBACK for {topic}")
        assert not any(rc.is_failure for rc in self.suback[mid]), self.suback[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        return info

    def topics(self) -> list[str]:
        with self.lock:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class FakeCentral:
    """Takes segments through ``$share/central/...`` and acks them ``stored`` (or not)."""

    def __init__(self, broker: Broker, pki: Pki, *, auto_ack: bool = True,
                 drop_first: bool = False, client_id: str = "central-test") -> None:
        self.auto_ack = auto_ack
        self.drop_first = drop_first
        self.received: Counter[int] = Counter()
        self.blobs: dict[int, bytes] = {}
        self.stored: set[int] = set()
        self.lock = threading.Lock()
        self.client = Client(broker, pki, "central", client_id, clean_start=False)
        self.client.on_message = self._on_segment
        self.client.subscribe(shared("central", SEGMENT_SUBSCRIPTION))

    def _on_segment(self, client: Client, msg: mqtt.MQTTMessage) -> None:
        dev, seq = parse_segment_topic(msg.topic)
        blob = bytes(msg.payload)
        with self.lock:
            self.received[seq] += 1
            self.blobs[seq] = blob
            first = self.received[seq] == 1
            if not self.auto_ack or (self.drop_first and first):
                return
            result = "duplicate" if seq in self.stored else "stored"
            self.stored.add(seq)
        client.c.publish(ack_topic(dev), Ack(seq=seq, sha256=sha(blob), result=result).encode(),
                         qos=1)

    def count(self, seq: int) -> int:
        with self.lock:
            return self.received[seq]

    def close(self) -> None:
        self.client.close()


def seal_chain(device_id: str, key: Any, recipients: list[str], count: int, *, seed: int,
               max_frames: int = 6000) -> list[bytes]:
    """``count`` real sealed segments (wire form) of one device, chained, seqs 0..count-1.

    Noise PCM of random length (80..max_frames frames at 8 kHz), so FLAC cannot shrink it
    much: sizes range from under 1 KB to ~10 KB, enough to exercise chunking at 4 KiB.
    """
    import numpy as np

    from linerec_contract.segment import SegmentInput, encode_wire, seal_segment

    rng = np.random.default_rng(seed)
    prev: str | None = None
    out = []
    for seq in range(count):
        frames = int(rng.integers(80, max_frames))
        pcm = rng.normal(0, 2000, frames).clip(-32768, 32767).astype(np.int16)
        inp = SegmentInput(line="line-1", call_id=f"call-{seq // 4}", part=seq % 4,
                           last_part=seq % 4 == 3, start_frame=seq * 10_000,
                           start_wall_ns=1_700_000_000_000_000_000 + seq * 10**9, rate=8000,
                           pcm=pcm, sensitive={}, gaps=[])
        seg = seal_segment(inp, device_id=device_id, seq=seq, prev_manifest_sha256=prev,
                           recipients=recipients, key=key, codec="flac")
        prev = seg.manifest_sha256
        out.append(encode_wire(seg))
    return out


def add_wire_segment(outbox: Outbox, wire: bytes) -> None:
    from linerec_contract.segment import decode_wire

    seg = decode_wire(wire)
    outbox.prepare(seg.seq, wire, seg.payload_sha256)
    outbox.commit(seg.seq)
