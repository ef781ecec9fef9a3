"""Status, telemetry and events recorded at central by the fleet service (real broker)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import locks
from appliance.sync.broker import Broker
from appliance.sync.uplink_base import boot_id
from central.fleet.link import BrokerAddress, operator_tls
from central.fleet.registry import Fleet
from central.fleet.service import FleetService
from central.fleet.store import FleetStore
from central.home import Home
from linerec_contract.durable import write_status

from .conftest import Box


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def service(home: Home, fleet: Fleet, broker: Broker) -> Iterator[FleetService]:
    stop = threading.Event()
    with FleetStore(home.root / "fleet" / "fleet.sqlite") as store, \
            operator_tls(fleet, "fleet") as tls:
        svc = FleetService(store, BrokerAddress(broker.host, broker.port), tls)
        thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
        thread.start()
        assert svc.ready.wait(30)
        try:
            yield svc
        finally:
            stop.set()
            thread.join(30)


def _status(svc: FleetService, dev: str) -> dict[str, object]:
    return svc.store.status(dev) or {}


def test_birth_telemetry_and_a_stale_death_ignored(
        service: FleetService, start_box: Callable[..., Box], broker: Broker,
        central: Callable[..., tuple[int, str, str]]) -> None:
    box = start_box("box-a", site="lyon", tags=["floor2"])
    _wait(lambda: _status(service, "box-a").get("state") == "online", "birth recorded")
    _wait(lambda: service.store.telemetry("box-a") is not None, "telemetry recorded")
    st = _status(service, "box-a")
    assert st["boot_id"] == boot_id() and st["session"] == 1 and st["version"]
    tel = service.store.telemetry("box-a")
    assert tel is not None
    for key in ("lines", "journal", "outbox", "link", "disk", "temperature_c", "uptime_s",
                "last_selftest", "alarms", "config_version"):
        assert key in tel, key
    assert tel["link"] == "ready"

    code, out, _ = central("ls", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row["device"] == "box-a" and row["state"] == "online" and row["telemetry_fresh"]
    assert row["site"] == "lyon"
    code, out, _ = central("ls", "site:lyon")
    assert "box-a" in out and "online" in out
    code, out, _ = central("ls", "tag:nope", "--json")
    assert json.loads(out) == []
    code, out, _ = central("show", "box-a")
    assert code == 0 and "state online" in out

    # Sparkplug: a death from another boot (or an earlier session) does not bury a live box.
    # (Handed to the service's message handler: only box-a may publish on its status topic, and
    # a second connection with its certificate would take over the live box's session.)
    stale = {"v": 1, "state": "offline", "version": "0.0.1", "boot_id": "an-old-boot",
             "session": 1, "ts": time.time()}
    service.handle("rec/v1/box-a/status", json.dumps(stale).encode())
    assert service.counters["stale_deaths"] == 1
    assert _status(service, "box-a")["state"] == "online"
    service.handle("rec/v1/box-a/status",
                   json.dumps({**stale, "boot_id": boot_id(), "session": 0}).encode())
    assert service.counters["stale_deaths"] == 2
    assert _status(service, "box-a")["state"] == "online"

    box.close()  # a clean stop publishes the will: the matching death is recorded
    _wait(lambda: _status(service, "box-a").get("state") == "offline", "death recorded")
    code, out, _ = central("ls", "--json")
    assert json.loads(out)[0]["state"] == "offline"
    assert not json.loads(out)[0]["telemetry_fresh"]


def test_alarms_raised_and_cleared_become_events(
        service: FleetService, start_box: Callable[..., Box],
        central: Callable[..., tuple[int, str, str]]) -> None:
    box = start_box("box-a")
    recorder = box.cfg.run_dir / "recorder.json"
    alarm = {"kind": "line-silent", "line": "L1", "ts": time.time()}

    def recorder_status(alarms: list[dict[str, object]]) -> None:
        write_status(recorder, {"ts": time.time(), "lines": [
            {"line": "L1", "in_call": False, "level_db": -70.0, "noise_floor_db": -72.0}],
            "alarms": alarms})

    # The recorder stands in by its status file and its lock (a stage runs when it holds both).
    locks.acquire(box.cfg.state_dir, "recorder", "recorder")
    try:
        recorder_status([])
        _wait(lambda: any(ln.get("line") == "L1" for ln in
                          (service.store.telemetry("box-a") or {}).get("lines", [])),
              "line L1 in telemetry")
        recorder_status([alarm])
        _wait(lambda: any(e["kind"] == "alarm-raised" and e.get("alarm") == "line-silent"
                          for e in service.store.events("box-a")), "alarm raised")
        recorder_status([])
        _wait(lambda: any(e["kind"] == "alarm-cleared" and e.get("alarm") == "line-silent"
                          for e in service.store.events("box-a")), "alarm cleared")
    finally:
        locks.release("recorder")
    code, out, _ = central("events", "--device", "box-a")
    assert code == 0 and "alarm-raised" in out and "alarm-cleared" in out
    tel = service.store.telemetry("box-a") or {}
    assert tel["lines"][0]["noise_floor_db"] == -72.0


def test_bad_messages_are_counted_and_never_stored(service: FleetService, home: Home,
                                                   tmp_path: Path) -> None:
    before = service.counters["ignored"]
    for topic, payload in (("rec/v1/box-a/status", b"not json"),
                           ("rec/v1/box-a/telemetry", b'{"v": 1, "device": "box-b"}'),
                           ("rec/v1/box-a/event", b'{"v": 1}'),
                           ("rec/v1/box-a/cmd/res", b'{"v": 2}'),
                           ("rec/v1/box-a/telemetry", b"x" * 70000)):
        service.handle(topic, payload)
    assert service.counters["ignored"] == before + 5
    assert service.store.status("box-a") is None and service.store.telemetry("box-a") is None
    assert service.store.events("box-a") == []


def test_a_flooding_box_is_rate_limited_and_others_still_recorded(service: FleetService) -> None:
    from central.fleet.service import RATE_BURST, RATE_PER_S

    telemetry = {"v": 1, "ts": 1.0, "device": "box-a", "lines": []}
    start = time.monotonic()
    for n in range(2000):
        service.handle("rec/v1/box-a/telemetry", json.dumps({**telemetry, "ts": n}).encode())
    elapsed = time.monotonic() - start
    # At most the burst plus what the budget refilled meanwhile got through.
    passed = 2000 - service.counters["rate_limited"]
    assert RATE_BURST <= passed <= RATE_BURST + RATE_PER_S * elapsed + 1
    service.handle("rec/v1/box-b/telemetry",
                   json.dumps({**telemetry, "device": "box-b"}).encode())
    assert service.store.telemetry("box-b") is not None  # another box is not slowed


def test_an_alarm_raised_and_cleared_while_offline_still_reaches_central(
        service: FleetService, start_box: Callable[..., Box], broker: Broker) -> None:
    """The broker goes away (the box is offline), a line alarm comes and goes, the broker comes
    back: central records both events, in order, with the times the box saw them."""
    box = start_box("box-a")
    recorder = box.cfg.run_dir / "recorder.json"
    alarm = {"kind": "line-silent", "line": "L1", "ts": time.time()}
    pending = box.cfg.state_dir / "fleet" / "events-pending.json"

    def recorder_status(alarms: list[dict[str, object]]) -> None:
        write_status(recorder, {"ts": time.time(), "lines": [
            {"line": "L1", "in_call": False, "level_db": -70.0, "noise_floor_db": -72.0}],
            "alarms": alarms})

    def queued() -> list[str]:
        try:
            return [e["kind"] for e in json.loads(pending.read_text())["events"]
                    if e.get("alarm") == "line-silent" and e.get("line") == "L1"]
        except (OSError, ValueError):
            return []

    locks.acquire(box.cfg.state_dir, "recorder", "recorder")
    try:
        recorder_status([])
        _wait(lambda: any(ln.get("line") == "L1" for ln in
                          (service.store.telemetry("box-a") or {}).get("lines", [])),
              "line L1 in telemetry")
        broker.stop()
        _wait(lambda: box.uplink._link != "ready", "the box offline")
        t_offline = time.time()
        recorder_status([alarm])
        _wait(lambda: queued() == ["alarm-raised"], "the raised alarm queued while offline")
        recorder_status([])
        _wait(lambda: queued() == ["alarm-raised", "alarm-cleared"], "the clear queued")
        t_back = time.time()
        assert box.uplink._link != "ready"  # it all happened while offline
        broker.start()
        _wait(lambda: [e["kind"] for e in service.store.events("box-a")
                       if e.get("alarm") == "line-silent"] == ["alarm-raised", "alarm-cleared"],
              "both events at central")
        _wait(lambda: not pending.exists() or json.loads(pending.read_text())["events"] == [],
              "the queue emptied once acknowledged")
    finally:
        locks.release("recorder")
    raised, cleared = [e for e in service.store.events("box-a") if e.get("alarm") == "line-silent"]
    assert t_offline <= raised["ts"] <= cleared["ts"] <= t_back
    assert raised["line"] == cleared["line"] == "L1"
