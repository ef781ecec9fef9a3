"""Network checks against a real mosquitto with TLS, the shipped configuration and ACL, on a
free loopback port, with certificates from a generated fleet CA (and a foreign one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.selftest import CheckResult, Verdict, run_selftest
from appliance.sync.broker import Broker, free_port
from linerec_contract.pki import Pki, ensure_pki

NETWORK = ["dns", "central-reachable", "uplink-tls", "uplink-auth"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("pki"), ["box1", "central"])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return ensure_pki(tmp_path_factory.mktemp("foreign"), ["box1"])


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", pki)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def results(tmp_path: Path, port: int, ca: Path, cert: Path, key: Path,
            transport: str = "mqtt") -> dict[str, CheckResult]:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[device]\nid = "box1"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[uplink]\ntransport = "{transport}"\nhost = "localhost"\nport = {port}\n'
                   f'ca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n')
    return {r.check: r for r in run_selftest(load_config(cfg), only=NETWORK).results}


def test_a_provisioned_box_passes(tmp_path: Path, pki: Pki, broker: Broker) -> None:
    res = results(tmp_path, broker.port, pki.ca_cert, pki.client_cert("box1"),
                  pki.client_key("box1"))
    assert {n: r.verdict for n, r in res.items()} == {n: Verdict.PASS for n in NETWORK}, res
    assert res["uplink-auth"].value == "CONNACK Success"
    assert isinstance(res["uplink-tls"].value, int) and res["uplink-tls"].value > 30
    assert res["central-reachable"].subject == f"localhost:{broker.port}"


def test_a_box_trusting_another_ca_is_not_talking_to_central(tmp_path: Path, pki: Pki,
                                                             foreign: Pki, broker: Broker) -> None:
    res = results(tmp_path, broker.port, foreign.ca_cert, pki.client_cert("box1"),
                  pki.client_key("box1"))
    assert res["central-reachable"].verdict is Verdict.PASS
    assert res["uplink-tls"].verdict is Verdict.FAIL
    assert "is not central as the box knows it" in res["uplink-tls"].hint
    assert res["uplink-auth"].verdict is Verdict.FAIL


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, foreign: Pki, pki: Pki,
                                                  broker: Broker) -> None:
    res = results(tmp_path, broker.port, pki.ca_cert, foreign.client_cert("box1"),
                  foreign.client_key("box1"))
    assert res["uplink-auth"].verdict is Verdict.FAIL
    assert "central refuses the box" in res["uplink-auth"].hint


def test_central_down_fails_reachability(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    res = results(tmp_path, port, pki.ca_cert, pki.client_cert("box1"), pki.client_key("box1"))
    assert res["dns"].verdict is Verdict.PASS
    r = res["central-reachable"]
    assert r.verdict is Verdict.FAIL and f"open TCP port {port}" in r.hint


def test_not_provisioned_and_transport_none_skip(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    res = results(tmp_path, 8883, missing, missing, missing)
    assert all(r.verdict is Verdict.SKIP and "appliance provision" in r.hint for r in res.values())
    res = results(tmp_path, 8883, missing, missing, missing, transport="none")
    assert all(r.verdict is Verdict.SKIP and "transport = 'none'" in r.hint for r in res.values())
