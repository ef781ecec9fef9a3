"""Enrolment through the real command lines, bundle validation, and revocation at the broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from appliance.sync.broker import Broker
from central.fleet.registry import Fleet
from central.home import Home

from .conftest import box_config


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                          check=False)


def pub(broker: Broker, ca: Path, cert: Path, key: Path, topic: str) -> int:
    return subprocess.run(
        ["mosquitto_pub", "-V", "5", "-h", broker.host, "-p", str(broker.port), "--cafile",
         str(ca), "--cert", str(cert), "--key", str(key), "-t", topic, "-m", "x", "-q", "1"],
        capture_output=True, text=True, timeout=30, check=False).returncode


def provision(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("-m", "appliance", "provision", "--config", str(config), *extra)


def enroll(home: Home, request: Path, bundle: Path, broker: Broker,
           *extra: str) -> subprocess.CompletedProcess[str]:
    return run("-m", "central", "--home", str(home.root), "fleet", "enroll", str(request),
               "--out", str(bundle), "--broker", f"{broker.host}:{broker.port}", *extra)


def test_enrolment_end_to_end_and_revocation(tmp_path: Path, home: Home, fleet: Fleet,
                                             broker: Broker) -> None:
    cfg, config = box_config(tmp_path, "box-a")
    made = provision(config)
    assert made.returncode == 0, made.stderr
    request = cfg.keys_dir / "enrolment-request.json"
    assert json.loads(request.read_text())["device_id"] == "box-a"
    assert (cfg.keys_dir / "client.key").stat().st_mode & 0o077 == 0
    bundle = tmp_path / "box-a.bundle.json"
    done = enroll(home, request, bundle, broker, "--site", "lyon", "--tag", "floor2")
    assert done.returncode == 0, done.stderr
    assert "PRIVATE" not in bundle.read_text()  # no private key ever travels
    installed = provision(config, "--install", str(bundle))
    assert installed.returncode == 0, installed.stderr
    assert "broker 127.0.0.1" in installed.stdout
    ca, cert, key = cfg.tls_paths()
    assert home.device("box-a") is not None  # its signing key is trusted for segments
    assert pub(broker, ca, cert, key, "rec/v1/box-a/telemetry") == 0
    # Installing again is idempotent.
    assert provision(config, "--install", str(bundle)).returncode == 0

    other_cfg, other_config = box_config(tmp_path, "box-b")
    assert provision(other_config).returncode == 0
    other_bundle = tmp_path / "box-b.bundle.json"
    assert enroll(home, other_cfg.keys_dir / "enrolment-request.json", other_bundle,
                  broker).returncode == 0
    assert provision(other_config, "--install", str(other_bundle)).returncode == 0

    revoked = run("-m", "central", "--home", str(home.root), "fleet", "revoke", "box-a")
    assert revoked.returncode == 0, revoked.stderr
    broker.reload()
    import time

    deadline = time.monotonic() + 30
    while pub(broker, ca, cert, key, "rec/v1/box-a/telemetry") == 0:
        assert time.monotonic() < deadline, "the broker still accepts the revoked box"
        time.sleep(0.2)
    oca, ocert, okey = other_cfg.tls_paths()
    assert pub(broker, oca, ocert, okey, "rec/v1/box-b/telemetry") == 0
    # A revoked id is not re-enrolled.
    again = enroll(home, request, tmp_path / "again.json", broker)
    assert again.returncode == 2 and "was revoked" in again.stderr


def test_bad_bundles_are_refused_in_one_line_and_nothing_is_written(
        tmp_path: Path, home: Home, fleet: Fleet, broker: Broker) -> None:
    cfg, config = box_config(tmp_path, "box-a")
    assert provision(config).returncode == 0
    other_cfg, other_config = box_config(tmp_path, "box-b")
    assert provision(other_config).returncode == 0
    b_bundle = tmp_path / "b.json"
    assert enroll(home, other_cfg.keys_dir / "enrolment-request.json", b_bundle,
                  broker).returncode == 0
    a_bundle = tmp_path / "a.json"
    assert enroll(home, cfg.keys_dir / "enrolment-request.json", a_bundle, broker).returncode == 0

    doc = json.loads(a_bundle.read_text())
    cases = {
        "for another box": (b_bundle.read_text(), "is for device box-b"),
        "not json": ("{", "not a UTF-8 JSON enrolment bundle"),
        "certificate of another key": (
            json.dumps({**doc, "cert_pem": json.loads(b_bundle.read_text())["cert_pem"]}),
            "names ['box-b']"),
        "bad port": (json.dumps({**doc, "broker": {"host": "x", "port": 0}}), "broker.port"),
        "bad recipient": (json.dumps({**doc, "recipients": ["age1nope"]}), "recipients"),
        "bad command key": (json.dumps({**doc, "command_key": "AAAA"}), "command_key"),
    }
    # A certificate from a CA other than the bundle's.
    other_home = tmp_path / "other-central"
    assert run("-m", "central", "--home", str(other_home), "init").returncode == 0
    foreign = tmp_path / "foreign.json"
    assert run("-m", "central", "--home", str(other_home), "fleet", "enroll",
               str(cfg.keys_dir / "enrolment-request.json"), "--out", str(foreign),
               "--broker", "127.0.0.1:1").returncode == 0
    cases["certificate from another CA"] = (
        json.dumps({**doc, "cert_pem": json.loads(foreign.read_text())["cert_pem"]}),
        "not issued by the bundle's CA")
    for name, (text, expected) in cases.items():
        path = tmp_path / f"bad-{name.replace(' ', '-')}.json"
        path.write_text(text)
        result = provision(config, "--install", str(path))
        assert result.returncode == 2, (name, result.stderr)
        assert expected in result.stderr, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    ca, cert, _key = cfg.tls_paths()
    assert not ca.exists() and not cert.exists()
    assert not (cfg.keys_dir / "enrolment.json").exists()


def test_enroll_refuses_reserved_and_forged_requests(tmp_path: Path, home: Home, fleet: Fleet,
                                                     broker: Broker) -> None:
    cfg, config = box_config(tmp_path, "central-evil")
    assert provision(config).returncode == 0
    out = enroll(home, cfg.keys_dir / "enrolment-request.json", tmp_path / "x.json", broker)
    assert out.returncode == 2 and "is reserved" in out.stderr
    cfg, config = box_config(tmp_path, "box-a")
    assert provision(config).returncode == 0
    req = json.loads((cfg.keys_dir / "enrolment-request.json").read_text())
    req["device_id"] = "box-z"  # the CSR still names box-a
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(req))
    out = enroll(home, forged, tmp_path / "y.json", broker)
    assert out.returncode == 2 and "names 'box-a'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
