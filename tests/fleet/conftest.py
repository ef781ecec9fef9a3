"""A fleet on loopback: central home with its fleet CA, the shipped broker, enrolled boxes whose
uplink runs the fleet agent (real mosquitto, real TLS, real enrolment)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config
from appliance.provision import central_command_key, install_bundle, make_request_document
from appliance.sync.broker import Broker
from appliance.sync.fleet_agent import FleetAgent
from appliance.sync.outbox import Outbox
from appliance.sync.uplink import Uplink
from appliance.sync.uplink_base import boot_id
from central.cli import main as central_main
from central.fleet.registry import Fleet
from central.home import Home, init_home


@dataclass
class Box:
    cfg: Config
    config_path: Path
    agent: FleetAgent
    uplink: Uplink
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def box_config(root: Path, dev: str, extra: str = "",
               telemetry_interval_s: float = 1.0) -> tuple[Config, Path]:
    from appliance.config import load_config

    path = root / dev / "appliance.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[device]\nid = "{dev}"\n[paths]\nstate_dir = "{root / dev / "state"}"\n'
                    f'[fleet]\ntelemetry_interval_s = {telemetry_interval_s}\n{extra}')
    return load_config(path), path


def enrol(fleet: Fleet, cfg: Config, port: int, tmp: Path, **kw: Any) -> Path:
    req = tmp / f"{cfg.device.id}.request.json"
    req.write_text(json.dumps(make_request_document(cfg)))
    bundle = tmp / f"{cfg.device.id}.bundle.json"
    bundle.write_text(json.dumps(fleet.enroll(req, host="127.0.0.1", port=port, **kw)))
    install_bundle(cfg, bundle)
    return bundle


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return init_home(tmp_path / "central")


@pytest.fixture
def fleet(home: Home) -> Fleet:
    f = Fleet(home)
    f.ensure()
    return f


@pytest.fixture
def broker(tmp_path: Path, fleet: Fleet) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", fleet.pki, autosave_interval_s=1)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def start_box(tmp_path: Path, fleet: Fleet, broker: Broker) -> Iterator[Callable[..., Box]]:
    made: list[Box] = []

    def make(dev: str = "box-a", *, extra: str = "", restart: Any = None, keepalive_s: int = 30,
             telemetry_interval_s: float = 1.0, **kw: Any) -> Box:
        cfg, path = box_config(tmp_path / "boxes", dev, extra, telemetry_interval_s)
        enrol(fleet, cfg, broker.port, tmp_path, **kw)
        ca, cert, key = cfg.tls_paths()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        agent = FleetAgent(cfg, central_key=central_command_key(cfg), boot_id=boot_id(),
                           config_path=path)
        if restart is not None:
            agent.config.restart = restart
        uplink = Uplink(device_id=dev, outbox=Outbox(cfg.outbox_dir), host=broker.host,
                        port=broker.port, ca=ca, cert=cert, key=key, agent=agent,
                        reconnect_min_s=0.05, reconnect_max_s=0.5, keepalive_s=keepalive_s,
                        status_path=cfg.run_dir / "uplink.json")
        stop = threading.Event()
        thread = threading.Thread(target=uplink.run, args=(stop,), daemon=True)
        thread.start()
        box = Box(cfg, path, agent, uplink, stop, thread)
        made.append(box)
        return box

    yield make
    for b in made:
        b.close()


@pytest.fixture
def central(home: Home, broker: Broker, capsys: pytest.CaptureFixture[str]
            ) -> Callable[..., tuple[int, str, str]]:
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        args = list(argv)
        if args[0] in ("cmd", "config") or args[:1] == ["serve"]:
            args += ["--broker", f"{broker.host}:{broker.port}"]
        code = central_main(["--home", str(home.root), "fleet", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
