"""The uplink against a real mosquitto and a tiny fake central (see helpers.FakeCentral)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from appliance.sync.broker import Broker
from appliance.sync.outbox import Outbox
from appliance.sync.protocol import Ack, Status, ack_topic, status_topic

from .conftest import RunningUplink
from .helpers import Client, FakeCentral, add_segment, sha, wait_until


def _blobs(n: int, seed: int) -> dict[int, bytes]:
    rnd = random.Random(seed)
    return {seq: rnd.randbytes(rnd.randint(1, 64 * 1024)) for seq in range(n)}


def test_all_segments_delivered_acked_and_deleted(
        outbox: Outbox, central: Callable[..., FakeCentral], client: Callable[..., Client],
        uplink: Callable[..., RunningUplink], tmp_path: Path) -> None:
    cen = central()
    watcher = client("central-2", "status-watcher")
    watcher.subscribe(status_topic("box1"))
    blobs = _blobs(40, seed=1)
    for seq in range(20):
        add_segment(outbox, seq, blobs[seq])
    # rescan_s is huge: segments committed after start must arrive through watchdog events.
    up = uplink(window=4, rescan_s=3600)
    wait_until(lambda: outbox.pending() == [], "first half drained")
    for seq in range(20, 40):
        add_segment(outbox, seq, blobs[seq])
    wait_until(lambda: outbox.pending() == [], "second half drained (watchdog wake-up)")

    assert cen.blobs == blobs
    assert outbox.highest_seq() == 39
    wait_until(lambda: up.uplink.stats()["acked"] == 40, "every ack counted")
    stats = up.uplink.stats()
    assert stats["acked"] == 40 and stats["backlog"]["segments"] == 0
    assert stats["link"] == "ready" and stats["session"] == 1
    status_file = tmp_path / "uplink-box1.json"
    wait_until(lambda: json.loads(status_file.read_text())["acked"] == 40,
               "status file (rewritten every second) catching up")
    status = json.loads(status_file.read_text())
    assert status["device_id"] == "box1" and status["link"] == "ready"
    assert set(status["backlog"]) == {"segments", "bytes", "oldest_age_s"}
    assert {"in_flight", "acked", "last_ack_ts", "ts"} <= set(status)
    online = [Status.decode(bytes(m.payload)) for m in watcher.messages]
    assert online and online[-1].state == "online" and online[-1].session == 1
    assert json.loads((outbox.path / "session.json").read_text()) == {"session": 1}

    up.close()
    wait_until(lambda: Status.decode(bytes(watcher.messages[-1].payload)).state == "offline",
               "retained offline status (will) after a clean stop")


def test_broker_killed_and_restarted_mid_stream(
        broker: Broker, outbox: Outbox, central: Callable[..., FakeCentral],
        uplink: Callable[..., RunningUplink]) -> None:
    cen = central()
    blobs = _blobs(60, seed=2)
    for seq in range(30):
        add_segment(outbox, seq, blobs[seq])
    up = uplink(window=8, ack_timeout_s=2.0, rescan_s=1.0)
    wait_until(lambda: len(cen.received) >= 3, "some deliveries before the crash")
    broker.kill()
    for seq in range(30, 60):  # the recorder keeps committing while the broker is down
        add_segment(outbox, seq, blobs[seq])
    broker.start()  # same port
    wait_until(lambda: outbox.pending() == [], "outbox drained after the broker restart",
               timeout=90)
    assert set(cen.blobs) == set(blobs)
    assert all(cen.blobs[s] == blobs[s] for s in blobs)
    assert up.uplink.stats()["connects"] >= 2
    assert up.uplink.stats()["session"] >= 2


def test_malformed_and_mismatched_acks_are_ignored(
        outbox: Outbox, central: Callable[..., FakeCentral], client: Callable[..., Client],
        uplink: Callable[..., RunningUplink]) -> None:
    cen = central(auto_ack=False)
    blob = os.urandom(5000)
    add_segment(outbox, 0, blob)
    up = uplink(ack_timeout_s=600)
    wait_until(lambda: cen.count(0) >= 1, "segment 0 at central")
    ctl = client("central-2", "ack-forger")
    garbage = [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps({"v": 2, "seq": 0, "sha256": sha(blob), "result": "stored"}).encode(),
        json.dumps({"v": 1, "seq": 0, "sha256": "nothex", "result": "stored"}).encode(),
        json.dumps({"v": 1, "seq": -1, "sha256": sha(blob), "result": "stored"}).encode(),
        json.dumps({"v": 1, "seq": 0, "sha256": sha(blob), "result": "maybe"}).encode(),
        b"[" * 60000 + b"]" * 60000,  # too big, and nested deep enough to break a naive parser
        b"[" * 30000,
        b"",
    ]
    for payload in garbage:
        ctl.publish(ack_topic("box1"), payload)
    wait_until(lambda: up.uplink.stats()["ignored_messages"] == len(garbage), "garbage handled")
    assert outbox.pending() == [0]

    ctl.publish(ack_topic("box1"), Ack(seq=0, sha256=sha(b"other"), result="stored").encode())
    wait_until(lambda: up.uplink.stats()["ack_mismatch"] == 1, "mismatched ack handled")
    assert outbox.pending() == [0]
    assert up.thread.is_alive()

    ctl.publish(ack_topic("box1"), Ack(seq=0, sha256=sha(blob), result="stored").encode())
    wait_until(lambda: outbox.pending() == [], "the genuine ack deletes the segment")


def test_retransmits_when_central_drops_the_first_delivery(
        outbox: Outbox, central: Callable[..., FakeCentral],
        uplink: Callable[..., RunningUplink]) -> None:
    cen = central(drop_first=True)
    blobs = _blobs(6, seed=3)
    for seq, blob in blobs.items():
        add_segment(outbox, seq, blob)
    up = uplink(window=3, ack_timeout_s=0.3)
    wait_until(lambda: outbox.pending() == [], "drained despite dropped first deliveries")
    assert all(cen.count(seq) >= 2 for seq in blobs)
    assert up.uplink.stats()["retransmitted"] >= len(blobs)


def test_rejected_segment_is_moved_not_deleted(
        outbox: Outbox, central: Callable[..., FakeCentral], client: Callable[..., Client],
        uplink: Callable[..., RunningUplink]) -> None:
    cen = central(auto_ack=False)
    add_segment(outbox, 4, b"refused by central")
    up = uplink(ack_timeout_s=600)
    wait_until(lambda: cen.count(4) >= 1, "segment at central")
    ctl = client("central-2", "rejecter")
    ctl.publish(ack_topic("box1"), Ack(seq=4, sha256=sha(b"refused by central"),
                                       result="rejected", reason="bad signature").encode())
    wait_until(lambda: outbox.rejected() == [4], "segment moved to rejected/")
    assert outbox.pending() == []
    wait_until(lambda: up.uplink.stats()["rejected"] == 1, "rejection counted")


def test_window_bounds_unacknowledged_segments(
        outbox: Outbox, central: Callable[..., FakeCentral],
        uplink: Callable[..., RunningUplink]) -> None:
    cen = central(auto_ack=False)
    for seq in range(10):
        add_segment(outbox, seq, bytes([seq]) * 10)
    up = uplink(window=3, ack_timeout_s=600)
    wait_until(lambda: len(cen.received) >= 3, "a full window at central")
    wait_until(lambda: up.uplink.stats()["in_flight"] == 3, "window full")
    assert up.uplink.stats()["published"] == 3
    assert sorted(cen.received) == [0, 1, 2]  # oldest first, and no more than the window
