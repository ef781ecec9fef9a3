"""Chunking through the real receiver, the HTTPS transport, upload order (real broker, real TLS)."""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.sync.broker import Broker
from appliance.sync.https_uplink import HttpsUplink
from appliance.sync.outbox import Outbox
from central.home import Home, init_home
from central.https import SegmentServer
from central.receiver import Receiver
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import Pki
from linerec_contract.protocol import Ack, ChunkInfo, segment_topic
from linerec_contract.segment import decode_wire

from .conftest import RunningUplink
from .helpers import Client, FakeCentral, add_segment, add_wire_segment, seal_chain, wait_until


@pytest.fixture
def home(tmp_path: Path) -> tuple[Home, DeviceKey]:
    h = init_home(tmp_path / "central")
    key = DeviceKey.generate()
    h.enroll("box1", key.public_b64)
    return h, key


def test_chunked_segments_are_reassembled_and_bad_chunks_ignored(
        broker: Broker, pki: Pki, outbox: Outbox, home: tuple[Home, DeviceKey],
        uplink: Callable[..., RunningUplink], client: Callable[..., Client]) -> None:
    h, key = home
    receiver = Receiver(h, host=broker.host, port=broker.port, ca=pki.ca_cert,
                        cert=pki.client_cert("central"), key=pki.client_key("central"))
    stop = threading.Event()
    thread = threading.Thread(target=receiver.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert receiver.ready.wait(30)
        # Forged chunks on the box's segment topic: bad properties, and chunks that do not join
        # to the announced hash. Logged and dropped; they must not block the real segments.
        forger = client("central-tool", "chunk-forger")
        forger.wait_connected()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        for user_props in ([("chunk", "x/y")], [("chunk", "0/2"), ("seg-sha256", "00"),
                                                ("seg-bytes", "5")],
                           ChunkInfo(0, 1, "0" * 64, 4).user_properties()):
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = user_props
            forger.c.publish(segment_topic("box1", 99), b"abcd", qos=1,
                             properties=props).wait_for_publish(30)
        wires = seal_chain("box1", key, h.recipients(), 12, seed=3, max_frames=20000)
        assert max(map(len, wires)) > 3 * 4096  # several chunks each
        for wire in wires:
            add_wire_segment(outbox, wire)
        uplink(chunk_bytes=4096, window=4)
        wait_until(lambda: outbox.pending() == [], "chunked segments acked")
        store = Store(h)
        assert [r.seq for r in store.iter_refs("box1")] == list(range(12))
        for wire in wires:
            seg = decode_wire(wire)
            assert store.load("box1", seg.seq).payload == seg.payload
        assert store.quarantine_entries() == []
        assert not any((h.root / "incoming" / "box1").iterdir())
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture
def https_server(home: tuple[Home, DeviceKey], pki: Pki) -> Iterator[SegmentServer]:
    server = SegmentServer(home[0], host="127.0.0.1", port=0, ca=pki.ca_cert,
                           cert=pki.server_cert, key=pki.server_key)
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(30)


def _put(pki: Pki, port: int, user: str, path: str, body: bytes,
         length: str | None = None) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.client_cert(user)), str(pki.client_key(user)))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.putrequest("PUT", path)
    conn.putheader("Content-Length", length if length is not None else str(len(body)))
    conn.endheaders()
    conn.send(body)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_https_transport_stores_is_idempotent_and_confines_each_box(
        https_server: SegmentServer, home: tuple[Home, DeviceKey], pki: Pki, outbox: Outbox,
        tmp_path: Path) -> None:
    h, key = home
    wires = seal_chain("box1", key, h.recipients(), 6, seed=4)
    for wire in wires:
        add_wire_segment(outbox, wire)
    up = HttpsUplink(device_id="box1", outbox=outbox, host="127.0.0.1", port=https_server.port,
                     ca=pki.ca_cert, cert=pki.client_cert("box1"), key=pki.client_key("box1"),
                     status_path=tmp_path / "up.json", reconnect_min_s=0.05,
                     reconnect_max_s=0.5)
    running = RunningUplink(up)
    try:
        wait_until(lambda: outbox.pending() == [], "HTTPS drain")
    finally:
        running.close()
    assert [r.seq for r in Store(h).iter_refs("box1")] == list(range(6))
    assert up.stats()["acked"] == 6

    status, body = _put(pki, https_server.port, "box1", "/v1/box1/seg/0", wires[0])
    assert status == 200 and Ack.decode(body).result == "duplicate"
    status, body = _put(pki, https_server.port, "box2", "/v1/box1/seg/0", wires[0])
    assert status == 403 and b"box2" in body
    status, _ = _put(pki, https_server.port, "box1", "/v1/box1/seg/0", b"", length=str(1 << 40))
    assert status == 413
    status, _ = _put(pki, https_server.port, "box1", "/v1/box1/other", b"x")
    assert status == 404
    status, body = _put(pki, https_server.port, "box1", "/v1/box1/seg/7", b"garbage")
    assert status == 422 and Ack.decode(body).result == "rejected"
    assert [r.seq for r in Store(h).iter_refs("box1")] == list(range(6))


def test_newest_first_order(outbox: Outbox, central: Callable[..., FakeCentral],
                            uplink: Callable[..., RunningUplink]) -> None:
    cen = central()
    order: list[int] = []
    original = cen._on_segment

    def record(client: Client, msg: object) -> None:
        order.append(int(msg.topic.rsplit("/", 1)[1]))  # type: ignore[attr-defined]
        original(client, msg)  # type: ignore[arg-type]

    cen.client.on_message = record
    for seq in range(10):
        add_segment(outbox, seq, bytes([seq]) * 100)
    uplink(window=1, order="newest")
    wait_until(lambda: outbox.pending() == [], "drain")
    assert order[:10] == list(range(9, -1, -1))
