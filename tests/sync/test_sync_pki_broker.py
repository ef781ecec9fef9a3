"""PKI generation, the private broker, and the broker's access rules (real mosquitto)."""

from __future__ import annotations

import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from appliance.sync import broker as broker_mod
from appliance.sync.broker import Broker
from linerec_contract.errors import DependencyError, FormatError
from linerec_contract.pki import ensure_pki

from .helpers import Client, wait_until


def test_pki_is_idempotent_keys_private_and_cn_is_the_user(tmp_path: Path) -> None:
    pki = ensure_pki(tmp_path, ["box1"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    pki2 = ensure_pki(tmp_path, ["box1", "central"])
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was rewritten"
    for key in (pki2.ca_key, pki2.server_key, pki2.client_key("box1"), pki2.client_key("central")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate(pki.client_cert("central").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "central"
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    with pytest.raises(FormatError, match="client name"):
        ensure_pki(tmp_path, ["bad/name"])


def test_missing_mosquitto_is_one_line_dependency_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_mod, "SEARCH_DIRS", (str(tmp_path),))
    pki = ensure_pki(tmp_path / "pki", [])
    with pytest.raises(DependencyError) as err:
        Broker(tmp_path / "b", pki).start()
    assert str(err.value).startswith("mosquitto not found: install it with 'apt-get install")
    assert "\n" not in str(err.value)


def test_restart_keeps_port_and_config_is_loopback_tls(broker: Broker) -> None:
    port = broker.port
    assert port > 0
    conf = broker.conf_path.read_text()
    assert f"listener {port} 127.0.0.1" in conf
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert broker.restart() == port
    assert broker.running


def test_box_is_confined_to_its_own_subtree(client: Callable[..., Client]) -> None:
    box1 = client("box1")
    box2 = client("box2")
    central = client("central")
    box1.wait_connected()
    for topic in ("rec/v1/#", "rec/v1/box2/#", "rec/v1/+/seg/+"):
        _, mid = box1.c.subscribe(topic, qos=1)
        wait_until(lambda mid=mid: mid in box1.suback, f"SUBACK for {topic}")
        assert [str(rc) for rc in box1.suback[mid]] == ["Not authorized"], topic
    box1.subscribe("rec/v1/box1/#")
    central.subscribe("rec/v1/#")
    box2.wait_connected()

    box2.publish("rec/v1/box2/telemetry", b"box2 telemetry")
    central.publish("rec/v1/box2/ack", b"ack for box2")
    denied = box1.publish("rec/v1/box2/seg/7", b"forged segment")
    assert denied.rc == mqtt.MQTT_ERR_SUCCESS  # PUBACK arrived; the broker dropped the message
    box1.publish("rec/v1/box1/seg/1", b"own segment")
    # Marker on box1's own subtree, published after every message above was PUBACKed.
    central.publish("rec/v1/box1/ack", b"marker")

    wait_until(lambda: "rec/v1/box1/ack" in box1.topics(), "marker at box1")
    wait_until(lambda: "rec/v1/box1/ack" in central.topics(), "marker at central")
    assert not [t for t in box1.topics() if t.startswith("rec/v1/box2/")]
    assert "rec/v1/box1/seg/1" not in box1.topics()  # a box writes its segments, never reads
    assert "rec/v1/box2/seg/7" not in central.topics()
    assert "rec/v1/box1/seg/1" in central.topics()
    assert "rec/v1/box2/telemetry" in central.topics()


def test_publish_outside_own_subtree_gets_not_authorized(client: Callable[..., Client]) -> None:
    box1 = client("box1")
    box1.wait_connected()
    results: dict[int, object] = {}
    done = threading.Event()

    def on_publish(c: object, ud: object, mid: int, rc: object, props: object) -> None:
        results[mid] = rc
        done.set()

    box1.c.on_publish = on_publish
    info = box1.c.publish("rec/v1/box2/ack", b"x", qos=1)
    assert done.wait(30)
    assert str(results[info.mid]) == "Not authorized"


def _connects(broker: Broker, ctx: ssl.SSLContext) -> bool:
    """True on CONNACK success, False once the broker refused (TLS alert, reset, close)."""
    outcome: list[bool] = []
    done = threading.Event()

    def decided(value: bool) -> None:
        outcome.append(value)
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5,
                    reconnect_on_failure=False)
    c.tls_set_context(ctx)
    c.on_connect = lambda c, ud, fl, rc, pr: decided(not rc.is_failure)
    c.on_disconnect = lambda c, ud, fl, rc, pr: decided(False)
    try:
        c.connect(broker.host, broker.port)
    except (ssl.SSLError, OSError):
        return False  # refused during the TLS handshake
    c.loop_start()
    try:
        assert done.wait(30), "the broker neither accepted nor refused the client"
        return outcome[0]
    finally:
        c.disconnect()
        c.loop_stop()


def test_client_without_a_valid_certificate_is_refused(broker: Broker, tmp_path: Path) -> None:
    pki = broker.pki
    good = ssl.create_default_context(cafile=str(pki.ca_cert))
    good.load_cert_chain(pki.client_cert("box1"), pki.client_key("box1"))
    assert _connects(broker, good)  # positive control

    no_cert = ssl.create_default_context(cafile=str(pki.ca_cert))
    assert not _connects(broker, no_cert)

    other = ensure_pki(tmp_path / "rogue", ["box1"])  # same CN, signed by another CA
    rogue = ssl.create_default_context(cafile=str(pki.ca_cert))
    rogue.load_cert_chain(other.client_cert("box1"), other.client_key("box1"))
    assert not _connects(broker, rogue)
