"""Fixtures for the sync tests: generated PKI and a real mosquitto on a free loopback port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.sync.broker import Broker
from appliance.sync.outbox import Outbox
from appliance.sync.uplink import Uplink
from linerec_contract.pki import Pki, ensure_pki

from .helpers import Client, FakeCentral

BOXES = ["box1", "box2"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # "central-tool": a second central identity for test clients beside the receiver (the broker
    # makes the certificate's CN the client id, so two clients never share one).
    return ensure_pki(tmp_path_factory.mktemp("pki"), [*BOXES, "central", "central-tool", "central-2"])


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", pki, central_users=("central", "central-tool"),
               autosave_interval_s=1)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox")


@pytest.fixture
def client(broker: Broker, pki: Pki) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(user: str, client_id: str | None = None, **kw: Any) -> Client:
        c = Client(broker, pki, user, client_id or f"{user}-t{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def central(broker: Broker, pki: Pki) -> Iterator[Callable[..., FakeCentral]]:
    made: list[FakeCentral] = []

    def make(**kw: Any) -> FakeCentral:
        c = FakeCentral(broker, pki, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class RunningUplink:
    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink
        self.stop = threading.Event()
        self.thread = threading.Thread(target=uplink.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "uplink.run did not return after stop was set"


@pytest.fixture
def uplink(broker: Broker, pki: Pki, outbox: Outbox,
           tmp_path: Path) -> Iterator[Callable[..., RunningUplink]]:
    made: list[RunningUplink] = []

    def make(device_id: str = "box1", **kw: Any) -> RunningUplink:
        kw.setdefault("reconnect_min_s", 0.05)
        kw.setdefault("reconnect_max_s", 0.5)
        kw.setdefault("status_path", tmp_path / f"uplink-{device_id}.json")
        up = Uplink(device_id=device_id, outbox=kw.pop("outbox", outbox), host=broker.host,
                    port=broker.port, ca=pki.ca_cert, cert=pki.client_cert(device_id),
                    key=pki.client_key(device_id), **kw)
        running = RunningUplink(up)
        made.append(running)
        return running

    yield make
    for r in made:
        r.close()
