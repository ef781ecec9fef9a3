"""`fleet broker-config` writes the shipped configuration for a real broker of this fleet; a
mosquitto started from it admits an enrolled box and keeps it out of central's shared filter."""

from __future__ import annotations

import getpass
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from appliance.sync.broker import find_mosquitto, free_port
from central.fleet.registry import Fleet

from .conftest import box_config, enrol


def test_broker_config_runs_and_enforces(tmp_path: Path, fleet: Fleet,
                                         central: Callable[..., tuple[int, str, str]]) -> None:
    port = free_port()
    out = tmp_path / "broker"
    code, text, err = central("broker-config", "--out", str(out), "--listen",
                              f"127.0.0.1:{port}", "--name", "127.0.0.1", "--name", "localhost",
                              "--user", getpass.getuser())
    assert code == 0, err
    conf = (out / "mosquitto.conf").read_text()
    assert "use_username_as_clientid true" in conf and f"crlfile {fleet.pki.crl}" in conf
    cfg, _ = box_config(tmp_path, "box-a")
    enrol(fleet, cfg, port, tmp_path)
    ca, cert, key = cfg.tls_paths()
    tls = ["-V", "5", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca), "--cert",
           str(cert), "--key", str(key)]
    broker = subprocess.Popen([find_mosquitto(), "-c", str(out / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert broker.poll() is None, broker.stderr.read() if broker.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        ok = subprocess.run(["mosquitto_pub", *tls, "-t", "rec/v1/box-a/telemetry", "-m", "x",
                             "-q", "1"], capture_output=True, text=True, timeout=30, check=False)
        assert ok.returncode == 0, ok.stderr
        sub = subprocess.run(["mosquitto_sub", *tls, "-t", "$share/central/rec/v1/+/seg/+",
                              "-W", "2"], capture_output=True, text=True, timeout=30, check=False)
        assert "denied" in sub.stderr.lower()
    finally:
        broker.terminate()
        broker.wait(30)
