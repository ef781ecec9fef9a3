"""The shipped broker configuration against an attacker holding a valid box certificate.

A real mosquitto runs the shipped ``broker_conf`` (TLS, CN = user name = client id, ACL, the
fleet_acl subscription guard, CRL). The attacker is box A using the stock ``mosquitto_sub`` and
``mosquitto_pub`` with its own certificate; box B and central are paho clients whose view of the
broker is the evidence.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from appliance.sync.broker import Broker
from linerec_contract.pki import Pki, write_crl
from linerec_contract.protocol import SEGMENT_SUBSCRIPTION, shared

from .helpers import Client, wait_until

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None,
                                reason="mosquitto-clients not installed")

A, B = "box1", "box2"


def _tls_args(broker: Broker, pki: Pki, user: str) -> list[str]:
    return ["-V", "5", "-h", broker.host, "-p", str(broker.port), "--cafile", str(pki.ca_cert),
            "--cert", str(pki.client_cert(user)), "--key", str(pki.client_key(user))]


def mosquitto_sub(broker: Broker, pki: Pki, user: str, topic: str, *, wait_s: int = 3,
                  client_id: str | None = None) -> subprocess.CompletedProcess[str]:
    """The stock subscriber: prints what it gets for ``wait_s`` seconds, then exits."""
    args = ["mosquitto_sub", *_tls_args(broker, pki, user), "-t", topic, "-v", "-W", str(wait_s),
            "-q", "1"]
    if client_id:
        args += ["-i", client_id]
    return subprocess.run(args, capture_output=True, text=True, timeout=wait_s + 30, check=False)


def mosquitto_pub(broker: Broker, pki: Pki, user: str, topic: str, message: str, *,
                  client_id: str | None = None) -> subprocess.CompletedProcess[str]:
    args = ["mosquitto_pub", *_tls_args(broker, pki, user), "-t", topic, "-m", message, "-q", "1"]
    if client_id:
        args += ["-i", client_id]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def _log(broker: Broker) -> str:
    return broker.log_path.read_text(errors="replace")


def test_a_cannot_subscribe_outside_its_subtree(broker: Broker, pki: Pki,
                                                client: Callable[..., Client]) -> None:
    central = client("central")
    central.subscribe("rec/v1/#")
    b = client(B)
    b.wait_connected()
    for topic in ("rec/v1/box2/#", "rec/v1/+/telemetry", "#", "rec/v1/#", "$SYS/#"):
        run = mosquitto_sub(broker, pki, A, topic, wait_s=1)
        # mosquitto_sub reports a refused subscription on stderr and exits non-zero.
        assert "denied" in run.stderr.lower(), (topic, run.stdout, run.stderr)
        assert run.stdout == "", (topic, run.stdout)
        assert f"refused subscription of {A} (user {A}) to {topic}" in _log(broker)
    # Positive control: A may subscribe to its own subtree and gets what central sends it there,
    # while B's message published in the same window never reaches A.
    with subprocess.Popen(["mosquitto_sub", *_tls_args(broker, pki, A), "-t", "rec/v1/box1/#",
                           "-v", "-W", "4", "-q", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as sub:
        wait_until(lambda: _log(broker).count(f"as {A} ") >= 6, "A's subscriber connected")
        time.sleep(0.5)  # SUBSCRIBE follows CONNECT on the same connection
        b.publish("rec/v1/box2/telemetry", b"B's telemetry")
        central.publish("rec/v1/box2/ack", b"ack meant for B")
        central.publish("rec/v1/box1/ack", b"ack meant for A")
        out, err = sub.communicate(timeout=30)
    assert "rec/v1/box1/ack ack meant for A" in out, (out, err)
    assert "box2" not in out


def test_a_cannot_write_into_b_or_central_topics(broker: Broker, pki: Pki,
                                                 client: Callable[..., Client]) -> None:
    central = client("central")
    central.subscribe("rec/v1/#")
    b = client(B)
    b.subscribe("rec/v1/box2/ack")
    b.subscribe("rec/v1/box2/cmd/req")
    for topic in ("rec/v1/box2/seg/7", "rec/v1/box2/status", "rec/v1/box2/ack",
                  "rec/v1/box2/cmd/req", "rec/v1/box1/ack", "rec/v1/box1/cmd/req",
                  "rec/v1/box1/config/desired", "rec/v1/central/x", "other/topic"):
        run = mosquitto_pub(broker, pki, A, topic, "forged")
        assert "not authorized" in (run.stdout + run.stderr).lower(), (topic, run.stderr)
    mosquitto_pub(broker, pki, A, "rec/v1/box1/telemetry", "marker")  # positive control
    wait_until(lambda: "rec/v1/box1/telemetry" in central.topics(), "A's own telemetry")
    assert [m.payload for m in central.messages] == [b"marker"]
    assert b.topics() == []


def test_a_cannot_join_centrals_shared_subscription(broker: Broker, pki: Pki,
                                                    client: Callable[..., Client]) -> None:
    central = client("central")
    central.subscribe(shared("central", SEGMENT_SUBSCRIPTION))
    b = client(B)
    b.wait_connected()
    filters = [shared("central", SEGMENT_SUBSCRIPTION), shared("central", "rec/v1/box2/seg/+"),
               shared("central", "rec/v1/box1/seg/+"), shared("x", "#"), SEGMENT_SUBSCRIPTION]
    attackers = [subprocess.Popen(["mosquitto_sub", *_tls_args(broker, pki, A), "-t", f,
                                   "-v", "-W", "6", "-q", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for f in filters]
    try:
        wait_until(lambda: all(f"to {f}" in _log(broker) for f in filters),
                   "every shared subscription refused")
        for seq in range(20):
            b.publish(f"rec/v1/box2/seg/{seq}", b"segment")
        wait_until(lambda: len(central.messages) >= 20, "all 20 segments at central")
    finally:
        outputs = [p.communicate(timeout=30) for p in attackers]
    assert sorted(central.topics()) == sorted(f"rec/v1/box2/seg/{s}" for s in range(20))
    for f, (out, err) in zip(filters, outputs, strict=True):
        assert out == "", (f, out)
        assert "denied" in err.lower(), (f, err)


@pytest.mark.parametrize("stolen", [B, "central"])
def test_a_cannot_take_another_client_id(broker: Broker, pki: Pki, client: Callable[..., Client],
                                         stolen: str) -> None:
    victim = client(stolen, stolen, clean_start=False)
    victim.wait_connected()
    disconnects: list[object] = []
    victim.c.on_disconnect = lambda *a: disconnects.append(a[3])
    for _ in range(3):
        run = mosquitto_pub(broker, pki, A, "rec/v1/box1/telemetry", "hello", client_id=stolen)
        assert run.returncode == 0, run.stderr
    log = _log(broker)
    # The broker replaced the requested client id with A's certificate identity.
    assert f"as {A} (p5" in log
    assert f"as {stolen} (p5" in log  # the victim's own connection
    assert log.count(f"as {stolen} (p5") == 1, "someone else connected under the victim's id"
    assert f"Client {stolen} already connected" not in log
    time.sleep(0.5)
    assert disconnects == [] and victim.c.is_connected()
    topic = "rec/v1/box2/ack" if stolen == B else "rec/v1/box1/telemetry"
    # The victim's session is intact: it still receives on its subscription.
    if stolen == B:
        central = client("central")
        victim.subscribe(topic)
        central.publish(topic, b"still here")
    else:
        victim.subscribe(topic)
        mosquitto_pub(broker, pki, A, topic, "still here")
    wait_until(lambda: topic in victim.topics(), "victim still subscribed")


def test_revoked_box_cannot_connect(broker: Broker, pki: Pki, tmp_path: Path) -> None:
    before = mosquitto_pub(broker, pki, A, "rec/v1/box1/telemetry", "before")
    assert before.returncode == 0, before.stderr  # positive control
    serial = x509.load_pem_x509_certificate(pki.client_cert(A).read_bytes()).serial_number
    crl_before = pki.crl.read_bytes()
    try:
        write_crl(pki, {serial: time.time()})
        broker.reload()
        wait_until(lambda: mosquitto_pub(broker, pki, A, "rec/v1/box1/telemetry",
                                         "after").returncode != 0,
                   "the broker to refuse the revoked certificate")
        after = mosquitto_pub(broker, pki, A, "rec/v1/box1/telemetry", "after")
        assert after.returncode != 0
        other = mosquitto_pub(broker, pki, B, "rec/v1/box2/telemetry", "B is not revoked")
        assert other.returncode == 0, other.stderr
    finally:
        pki.crl.write_bytes(crl_before)  # the PKI fixture is shared by the session
