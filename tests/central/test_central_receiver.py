"""The receiver's checks (called directly) and end to end through a real mosquitto."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import central.receiver as receiver_module
from appliance.sync.broker import Broker
from central.home import Home
from central.receiver import Receiver
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import ensure_pki
from linerec_contract.protocol import Ack, ack_topic, segment_topic
from linerec_contract.segment import SealedSegment, decode_wire, encode_wire

from .central_helpers import DEVICE, Box, known_signal


def offline_receiver(home: Home) -> Receiver:
    return Receiver(home, host="unused", port=1, ca=home.root, cert=home.root, key=home.root,
                    client_id="offline")


def tampered(seg: SealedSegment) -> bytes:
    payload = bytearray(seg.payload)
    payload[len(payload) // 2] ^= 0x01
    return encode_wire(SealedSegment(seg.manifest, seg.signature, bytes(payload)))


def test_checks_reject_and_quarantine(home: Home, box: Box, make_box) -> None:
    receiver = offline_receiver(home)
    segs = box.seal_call("c1", known_signal(3000), 3)
    cases = {
        "verification failed": (segment_topic(DEVICE, 0), tampered(segs[0])),
        "malformed segment": (segment_topic(DEVICE, 0), b"RSEG\x01garbage"),
        "topic names": (segment_topic(DEVICE, 5), encode_wire(segs[0])),
    }
    other = make_box("box-2")  # enrolled, but its key is not box-1's
    forged = Box(DEVICE, other.key, home.recipients()).seal_call("f", known_signal(80), 1)[0]
    cases["is not a trusted key of device box-1"] = (segment_topic(DEVICE, 0), encode_wire(forged))
    for expected, (topic, blob) in cases.items():
        outcome = receiver.handle(topic, blob)
        assert outcome.ack is not None
        assert outcome.ack.result == "rejected" and expected in outcome.ack.reason, outcome.detail
    assert len(Store(home).quarantine_entries()) == 4
    # A box that is not enrolled is refused and counted, never quarantined nor answered.
    stranger = Box("box-x", DeviceKey.generate(), home.recipients())
    foreign = stranger.seal_call("s", known_signal(80), 1)[0]
    outcome = receiver.handle(segment_topic("box-x", 0), encode_wire(foreign))
    assert outcome.ack is None and outcome.refused == "not_enrolled"
    assert receiver.counts["not_enrolled"] == 1
    assert len(Store(home).quarantine_entries()) == 4
    assert list(Store(home).iter_refs()) == []
    for topic in ("rec/v1/box-1/seg/notanumber", "rec/v1/box-1/seg/\u00b2", "rec/v1/box-1/seg/-1",
                  "rec/v1/box-1/seg/1000000000000", "rec/v1/box-1/seg/01"):
        outcome = receiver.handle(topic, b"x")
        assert outcome.ack is None and outcome.refused == "malformed", topic
    assert len(Store(home).quarantine_entries()) == 4


def test_out_of_order_is_fine_but_a_broken_link_is_rejected(home: Home, box: Box) -> None:
    receiver = offline_receiver(home)
    segs = box.seal_call("c1", known_signal(3000), 3)
    for seg in (segs[2], segs[0]):  # seq 1 missing: not an error at receive time
        outcome = receiver.handle(segment_topic(DEVICE, seg.seq), encode_wire(seg))
        assert outcome.ack is not None and outcome.ack.result == "stored"
        assert outcome.ack.sha256 == seg.payload_sha256
    fork = Box(DEVICE, box.key, box.recipients, seq=1, prev="0" * 64)  # links to nothing stored
    bad = fork.seal_call("c1", known_signal(1000), 1)[0]
    outcome = receiver.handle(segment_topic(DEVICE, 1), encode_wire(bad))
    assert outcome.ack is not None and outcome.ack.result == "rejected"
    assert "chain break" in outcome.ack.reason
    outcome = receiver.handle(segment_topic(DEVICE, 1), encode_wire(segs[1]))
    assert outcome.ack is not None and outcome.ack.result == "stored"


# -- end to end with a real mosquitto ------------------------------------------------------


@pytest.fixture()
def broker(tmp_path: Path):
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    pki = ensure_pki(tmp_path / "pki", ["central", DEVICE])
    b = Broker(tmp_path / "broker", pki)
    b.start()
    yield b
    b.stop()


class BoxClient:
    """A box's MQTT connection (its own certificate): publishes segments, collects acks."""

    def __init__(self, broker: Broker) -> None:
        self.acks: queue.Queue[Ack] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE, protocol=mqtt.MQTTv5)
        pki = broker.pki
        self.client.tls_set(str(pki.ca_cert), str(pki.client_cert(DEVICE)), str(pki.client_key(DEVICE)))
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, msg: self.acks.put(Ack.decode(msg.payload))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(ack_topic(DEVICE), qos=1)
        assert subscribed.wait(10)

    def send(self, seq: int, blob: bytes) -> Ack:
        self.client.publish(segment_topic(DEVICE, seq), blob, qos=1).wait_for_publish(10)
        return self.acks.get(timeout=20)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_end_to_end_stored_duplicate_rejected(home: Home, box: Box, broker: Broker) -> None:
    pki = broker.pki
    receiver = Receiver(
        home, host=broker.host, port=broker.port, ca=pki.ca_cert,
        cert=pki.client_cert("central"), key=pki.client_key("central"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=receiver.run, args=(stop,), daemon=True)
    thread.start()
    assert receiver.ready.wait(15), "receiver did not subscribe"
    client = BoxClient(broker)
    try:
        seg = box.seal_call("c1", known_signal(1600), 1)[0]
        ack = client.send(0, encode_wire(seg))
        assert (ack.seq, ack.result, ack.sha256) == (0, "stored", seg.payload_sha256)
        assert Store(home).load(DEVICE, 0).payload == seg.payload
        assert client.send(0, encode_wire(seg)).result == "duplicate"
        nxt = box.seal_call("c2", known_signal(800, seed=3), 1)[0]
        damaged = tampered(nxt)
        ack = client.send(1, damaged)
        assert ack.result == "rejected" and "verification failed" in ack.reason
        # the ack names the bytes central got, so the box keeps its good copy and resends it
        assert ack.sha256 == hashlib.sha256(decode_wire(damaged).payload).hexdigest()
        assert ack.sha256 != nxt.payload_sha256
        assert len(Store(home).quarantine_entries()) == 1
        assert client.send(1, encode_wire(nxt)).result == "stored"  # still running
        assert thread.is_alive()
        counts = {k: v for k, v in receiver.counts.items() if v}
        assert counts == {"stored": 2, "duplicate": 1, "rejected": 1}
    finally:
        client.close()
        stop.set()
        thread.join(15)
    assert not thread.is_alive()


def test_segment_published_while_receiver_down_arrives_after_restart(
    home: Home, box: Box, broker: Broker
) -> None:
    pki = broker.pki

    def start() -> tuple[Receiver, threading.Event, threading.Thread]:
        r = Receiver(
            home, host=broker.host, port=broker.port, ca=pki.ca_cert,
            cert=pki.client_cert("central"), key=pki.client_key("central"),
        )
        ev = threading.Event()
        th = threading.Thread(target=r.run, args=(ev,), daemon=True)
        th.start()
        assert r.ready.wait(15)
        return r, ev, th

    _, stop, thread = start()  # creates the persistent session and its subscription
    stop.set()
    thread.join(15)
    client = BoxClient(broker)
    try:
        seg = box.seal_call("c1", known_signal(800), 1)[0]
        client.client.publish(segment_topic(DEVICE, 0), encode_wire(seg), qos=1).wait_for_publish(10)
        _, stop, thread = start()
        ack = client.acks.get(timeout=20)
        assert ack.result == "stored" and Store(home).exists(DEVICE, 0)
    finally:
        client.close()
        stop.set()
        thread.join(15)


def test_storage_error_means_no_ack_and_the_broker_redelivers(
    home: Home, box: Box, broker: Broker, monkeypatch
) -> None:
    monkeypatch.setattr(receiver_module, "RETRY_AFTER_STORAGE_ERROR_S", 0.2)
    real_put = Store.put_locked
    failures = []

    def full_disk_once(self: Store, seg: SealedSegment) -> str:
        if not failures:
            failures.append(seg.seq)
            raise OSError(28, "No space left on device")
        return real_put(self, seg)

    monkeypatch.setattr(Store, "put_locked", full_disk_once)
    pki = broker.pki
    receiver = Receiver(
        home, host=broker.host, port=broker.port, ca=pki.ca_cert,
        cert=pki.client_cert("central"), key=pki.client_key("central"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=receiver.run, args=(stop,), daemon=True)
    thread.start()
    assert receiver.ready.wait(15)
    client = BoxClient(broker)
    try:
        seg = box.seal_call("c1", known_signal(800), 1)[0]
        ack = client.send(0, encode_wire(seg))
        assert failures == [0], "the first attempt should have hit the full disk"
        assert ack.result == "stored" and Store(home).exists(DEVICE, 0)
        assert receiver.counts["unanswered"] == 1 and receiver.counts["stored"] == 1
    finally:
        client.close()
        stop.set()
        thread.join(15)


def test_serve_command_uses_central_toml(home: Home, box: Box, broker: Broker) -> None:
    pki = broker.pki
    (home.root / "central.toml").write_text(
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nca = "{pki.ca_cert}"\n'
        f'cert = "{pki.client_cert("central")}"\nkey = "{pki.client_key("central")}"\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "central", "--home", str(home.root), "serve"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "subscribed to" in line:
                break
        client = BoxClient(broker)
        try:
            seg = box.seal_call("c1", known_signal(800), 1)[0]
            assert client.send(0, encode_wire(seg)).result == "stored"
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        if proc.stderr is not None:
            proc.stderr.close()
    assert code == 0


def test_a_dead_network_loop_is_noticed_and_replaced(
    home: Home, box: Box, broker: Broker, monkeypatch
) -> None:
    """paho's network thread dying (as it did on a seq of '²') must not end the intake."""
    real_loop = mqtt.Client.loop_forever
    deaths: list[str] = []

    def dies_once(self: mqtt.Client, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not deaths:
            deaths.append(str(self._client_id))
            raise ValueError("invalid literal for int() with base 10: '\u00b2'")
        return real_loop(self, *args, **kwargs)

    monkeypatch.setattr(mqtt.Client, "loop_forever", dies_once)
    pki = broker.pki
    receiver = Receiver(
        home, host=broker.host, port=broker.port, ca=pki.ca_cert,
        cert=pki.client_cert("central"), key=pki.client_key("central"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=receiver.run, args=(stop,), daemon=True)
    thread.start()
    client = None
    try:
        assert receiver.ready.wait(20), "the receiver did not come back after its loop died"
        assert deaths and receiver.counts["reconnects"] == 1
        client = BoxClient(broker)
        seg = box.seal_call("c1", known_signal(800), 1)[0]
        assert client.send(0, encode_wire(seg)).result == "stored"
    finally:
        if client is not None:
            client.close()
        stop.set()
        thread.join(15)
