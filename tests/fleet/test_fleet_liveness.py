"""Liveness: a box declares its keep-alive, sends a heartbeat when nothing else went out for a
quarter of it, and central records it offline after half of it without a message (reason
``silent``) or at its last will (reason ``will``). The scale test proves the bound with 500
boxes; here the real agent's heartbeat and the store's rules, one by one."""

from __future__ import annotations

import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.sync.broker import Broker
from central.fleet.link import BrokerAddress, operator_tls
from central.fleet.registry import Fleet
from central.fleet.service import FleetService
from central.fleet.store import FleetStore
from central.home import Home
from linerec_contract.fleet_protocol import SILENCE_FRACTION

from .conftest import Box

K = 8  # the keep-alive of the boxes in the store tests


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _birth(state: str = "online", session: int = 1, keepalive_s: int = K) -> dict[str, object]:
    return {"state": state, "version": "0.1.0", "boot_id": "boot-1", "session": session,
            "ts": time.time(), "config_version": 0, "keepalive_s": keepalive_s}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    with FleetStore(tmp_path / "fleet.sqlite") as s:
        yield s


def test_silence_is_judged_at_half_the_keepalive_and_undone_by_a_message(
        store: FleetStore) -> None:
    assert store.record_status("box-a", _birth())
    assert store.record_status("box-b", _birth(keepalive_s=0))  # declares none: never judged
    seen = store.status("box-a")["last_seen"]  # type: ignore[index]
    assert store.mark_silent(seen + SILENCE_FRACTION * K - 0.1) == []
    assert store.mark_silent(seen + SILENCE_FRACTION * K + 0.1) == ["box-a"]
    st = store.status("box-a")
    assert st is not None and st["state"] == "offline" and st["offline_reason"] == "silent"
    assert st["offline_at"] == seen + SILENCE_FRACTION * K + 0.1
    assert store.status("box-b")["state"] == "online"  # type: ignore[index]

    # A message of the same connection: it was only late; online again, no offline time.
    assert store.touch("box-a", seen + 5.0) is True
    st = store.status("box-a")
    assert st is not None and st["state"] == "online" and st["offline_at"] is None
    assert st["last_seen"] == seen + 5.0
    assert store.mark_silent(seen + 5.0 + SILENCE_FRACTION * K - 0.1) == []

    # Central's own subscription began later: silence counts from then at the earliest.
    late = seen + 100.0
    assert store.mark_silent(late, since=late - 1.0) == []
    assert store.mark_silent(late, since=late - SILENCE_FRACTION * K - 0.1) == ["box-a"]
    first = store.status("box-a")["offline_at"]  # type: ignore[index]

    # The broker's will for that connection comes later: offline, first time kept.
    assert store.record_status("box-a", _birth("offline"))
    st = store.status("box-a")
    assert st is not None and st["state"] == "offline" and st["offline_reason"] == "will"
    assert st["offline_at"] == first
    # After a will nothing but a new birth brings the box back.
    assert store.touch("box-a") is False
    assert store.status("box-a")["state"] == "offline"  # type: ignore[index]
    assert store.record_status("box-a", _birth(session=2))
    st = store.status("box-a")
    assert st is not None and st["state"] == "online" and st["offline_at"] is None
    assert st["keepalive_s"] == K


def test_a_will_is_recorded_when_it_arrives(store: FleetStore) -> None:
    assert store.record_status("box-a", _birth())
    before = time.time()
    assert store.record_status("box-a", _birth("offline"))
    st = store.status("box-a")
    assert st is not None and st["offline_reason"] == "will"
    assert before <= st["offline_at"] <= time.time()
    assert store.mark_silent(time.time() + 10 * K) == []  # offline boxes are not judged again


def test_a_store_from_before_liveness_gains_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE status (device TEXT PRIMARY KEY, state TEXT NOT NULL, version TEXT, "
               "boot_id TEXT, session INTEGER, config_version INTEGER, ts REAL, "
               "received_at REAL NOT NULL, online_since REAL)")
    db.execute("INSERT INTO status VALUES ('box-a', 'online', '0.1.0', 'b', 1, 0, 1.0, 1.0, 1.0)")
    db.commit()
    db.close()
    with FleetStore(path) as store:
        st = store.status("box-a")
        assert st is not None and st["state"] == "online" and st["keepalive_s"] is None
        assert store.mark_silent(time.time()) == []  # no keep-alive declared: not judged


def test_no_box_is_judged_while_central_is_not_subscribed(store: FleetStore) -> None:
    svc = FleetService(store, BrokerAddress("127.0.0.1", 1), ssl.create_default_context())
    assert store.record_status("box-a", _birth())
    assert svc.sweep(time.time() + 10 * K) == []
    assert store.status("box-a")["state"] == "online"  # type: ignore[index]


def test_the_real_agent_beats_between_telemetry_and_leaves_by_its_will(
        home: Home, fleet: Fleet, broker: Broker, start_box: Callable[..., Box]) -> None:
    stop = threading.Event()
    with FleetStore(home.root / "fleet" / "fleet.sqlite") as store, \
            operator_tls(fleet, "fleet") as tls:
        svc = FleetService(store, BrokerAddress(broker.host, broker.port), tls)
        thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
        thread.start()
        try:
            assert svc.ready.wait(30)
            # Telemetry once a minute, keep-alive 5 s: only heartbeats can keep it online.
            box = start_box("box-a", keepalive_s=5, telemetry_interval_s=60.0)
            _wait(lambda: (store.status("box-a") or {}).get("state") == "online", "birth")
            st = store.status("box-a")
            assert st is not None and st["keepalive_s"] == 5
            _wait(lambda: box.agent.counters["heartbeats"] >= 3, "three heartbeats")
            assert box.agent.counters["telemetry"] == 1
            tel = store.telemetry("box-a")
            assert tel is not None
            _wait(lambda: (store.status("box-a") or {}).get("last_seen", 0)
                  > tel["received_at"] + 5 * SILENCE_FRACTION, "a heartbeat recorded")
            st = store.status("box-a")
            assert st is not None and st["state"] == "online" and st["offline_reason"] is None
            box.close()  # a clean stop: disconnect with will
            _wait(lambda: (store.status("box-a") or {}).get("state") == "offline", "the will")
            assert store.status("box-a")["offline_reason"] == "will"  # type: ignore[index]
        finally:
            stop.set()
            thread.join(30)
