"""The agent's queue of alarm events: bounded, durable across a restart, paced below central's
per-box budget, and emptied only by the broker's acknowledgements. The broker is stood in for
by a client that records publishes and acknowledges on demand (the real broker path is
tests/fleet/test_fleet_status.py, an alarm raised and cleared while the box is offline)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from appliance.sync.fleet_agent import EVENT_BURST, MAX_PENDING_EVENTS, FleetAgent

from .conftest import box_config


class Info:
    def __init__(self) -> None:
        self.acked = False
        self.rc = mqtt.MQTT_ERR_SUCCESS  # queued by paho

    def is_published(self) -> bool:
        return self.acked


class Recorder:
    """Stands in for paho's client: records QoS 1 publishes, acknowledges when told."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], Info]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, **_: object) -> Info:
        assert topic == "rec/v1/box-a/event" and qos == 1
        info = Info()
        self.sent.append((json.loads(payload), info))
        return info


def test_the_event_queue_is_bounded_durable_paced_and_acknowledged(tmp_path: Path) -> None:
    cfg, path = box_config(tmp_path, "box-a")
    agent = FleetAgent(cfg, central_key=None, boot_id="boot-1", config_path=path)
    alarm = {"alarm": "line-silent", "line": "L1"}
    now = time.monotonic()
    agent._observe([], now)  # the first look is the baseline: no event
    pairs = MAX_PENDING_EVENTS // 2 + 50
    for _ in range(pairs):  # raised and cleared, again and again, with no link
        agent._observe([alarm], now)
        agent._observe([dict(alarm, detail="changes at every look")], now)  # same alarm
        agent._observe([], now)
    pending = json.loads((cfg.state_dir / "fleet" / "events-pending.json").read_text())
    assert len(pending["events"]) == MAX_PENDING_EVENTS
    assert pending["dropped"] == 2 * pairs - MAX_PENDING_EVENTS
    assert [e["kind"] for e in pending["events"][:2]] == ["alarm-raised", "alarm-cleared"]

    # A restart keeps the queue (the link was never up).
    agent = FleetAgent(cfg, central_key=None, boot_id="boot-1", config_path=path)
    client = Recorder()
    agent._flush_events(client)  # type: ignore[arg-type]
    assert len(client.sent) == EVENT_BURST  # paced: a burst now, the rest over time
    first = client.sent[0][0]
    assert first["kind"] == "events-dropped" and first["count"] == 2 * pairs - MAX_PENDING_EVENTS
    seqs = [e["seq"] for e, _ in client.sent[1:]]
    assert seqs == sorted(seqs)  # in order

    # Nothing leaves the queue until the broker acknowledged it.
    agent._flush_events(client)  # type: ignore[arg-type]
    queued = json.loads((cfg.state_dir / "fleet" / "events-pending.json").read_text())["events"]
    assert len(queued) == MAX_PENDING_EVENTS + 1
    for _, info in client.sent[:10]:
        info.acked = True
    agent._flush_events(client)  # type: ignore[arg-type]
    queued = json.loads((cfg.state_dir / "fleet" / "events-pending.json").read_text())["events"]
    assert len(queued) == MAX_PENDING_EVENTS + 1 - 10
    assert {e["seq"] for e, _ in client.sent[:10]}.isdisjoint(e["seq"] for e in queued)

    # A new connection sends again what the last one did not get acknowledged.
    again = Recorder()
    agent._event_tokens = EVENT_BURST
    agent._flush_events(again)  # type: ignore[arg-type]
    assert [e["seq"] for e, _ in again.sent[:10]] == [e["seq"] for e, _ in client.sent[10:20]]


def test_a_publish_refused_while_the_link_is_down_stays_queued(tmp_path: Path) -> None:
    """The link can drop between two ticks. paho then refuses the publish at once
    (MQTT_ERR_NO_CONN) and raises if asked whether it was published; the uplink stage must
    not die of it, and the event must be sent on the next tick. The client here is paho's
    own, never connected, so the refusal is the library's, not a stand-in's."""
    cfg, path = box_config(tmp_path, "box-a")
    agent = FleetAgent(cfg, central_key=None, boot_id="boot-1", config_path=path)
    now = time.monotonic()
    agent._observe([], now)
    agent._observe([{"alarm": "line-silent", "line": "L1"}], now)
    offline = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="box-a")
    agent._flush_events(offline)
    agent._flush_events(offline)  # asks about the refused publish: must not raise
    queued = json.loads((cfg.state_dir / "fleet" / "events-pending.json").read_text())["events"]
    assert [e["kind"] for e in queued] == ["alarm-raised"]
    assert agent.counters["events"] == 2  # tried on both ticks

    online = Recorder()
    agent._flush_events(online)  # type: ignore[arg-type]
    assert [e["kind"] for e, _ in online.sent] == ["alarm-raised"]
    online.sent[0][1].acked = True
    agent._flush_events(online)  # type: ignore[arg-type]
    queued = json.loads((cfg.state_dir / "fleet" / "events-pending.json").read_text())["events"]
    assert queued == []
