"""Operator certificates (``central-cli-*``, ``central-fleet-*``) are short-lived, not revoked:
a tool's lives its own timeout plus five minutes from two minutes before now, ``fleet serve``
renews its own at half its life, and the real broker with the shipped configuration refuses one
that has expired (a fresh one, same CA and rights, is let in: the refusal is the expiry)."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

from cryptography import x509

from appliance.sync.broker import Broker
from central.fleet.link import operator_cert
from central.fleet.registry import Fleet


def _publish(broker: Broker, fleet: Fleet, cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mosquitto_pub", "-V", "5", "-h", broker.host, "-p", str(broker.port), "--cafile",
         str(fleet.pki.ca_cert), "--cert", str(cert), "--key", str(key), "-t",
         "rec/v1/probe/ack", "-m", "probe"], capture_output=True, text=True, timeout=60,
        check=False)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_tool_certificates_live_minutes_from_a_small_backdate(fleet: Fleet) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with operator_cert(fleet, "cli", 15 + 300) as cert:
        c = _load(cert.cert_path)
        cn = c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str) and cn.startswith("central-cli-")
        start, end = c.not_valid_before_utc, c.not_valid_after_utc
        assert end - start == dt.timedelta(minutes=2, seconds=315)
        assert before - dt.timedelta(minutes=2, seconds=1) <= start <= before
        folder = cert.cert_path.parent
    assert not folder.exists()  # the key is gone with the tool


def test_an_expired_operator_certificate_is_refused_by_the_broker(fleet: Fleet,
                                                                   broker: Broker) -> None:
    with operator_cert(fleet, "cli", 1) as short, operator_cert(fleet, "cli", 300) as fresh:
        ok = _publish(broker, fleet, fresh.cert_path, fresh.key_path)
        assert ok.returncode == 0, ok.stderr
        # Wait until the short one has expired by the certificate's own date.
        while time.time() < short.expires_at + 1.5:
            time.sleep(0.2)
        seen = broker.log_path.read_text().count("certificate verify failed")
        refused = _publish(broker, fleet, short.cert_path, short.key_path)
        assert refused.returncode != 0
        assert "error" in refused.stderr.lower(), refused.stderr
        # The broker's TLS layer refused the certificate itself (OpenSSL: verify failed).
        deadline = time.monotonic() + 30
        while broker.log_path.read_text().count("certificate verify failed") == seen:
            assert time.monotonic() < deadline, broker.log_path.read_text()[-2000:]
            time.sleep(0.1)
        print(f"\nexpired operator certificate: mosquitto_pub exit {refused.returncode}: "
              f"{refused.stderr.strip()}")


def test_fleet_serve_renews_its_certificate_at_half_its_life(fleet: Fleet,
                                                             broker: Broker) -> None:
    with operator_cert(fleet, "fleet", 900) as cert:
        first_cn, first_end = cert.cn, cert.expires_at
        assert not cert.due(first_end - 451) and cert.due(first_end - 449)
        cert.renew()
        assert cert.cn != first_cn and cert.cn.startswith("central-fleet-")
        [cn] = _load(cert.cert_path).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        assert cn.value == cert.cn
        ok = _publish(broker, fleet, cert.cert_path, cert.key_path)
        assert ok.returncode == 0, ok.stderr
