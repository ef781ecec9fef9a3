"""Scale: 500 simulated boxes against one mosquitto with the shipped configuration.

Light agents (tests/fleet/simfleet.py, 100 MQTT clients per process, each box with its own
client certificate from the fleet CA) publish the real status/will and telemetry; central's real
fleet service (``appliance-central fleet serve``) records them; ``fleet ls --json`` must show
every box online with fresh telemetry. Then one simulator process is frozen (SIGSTOP: its 100
connections stay open but fall silent, as when a site's link dies without a FIN): the broker's
keep-alive expires, their wills arrive, and exactly those 100 must show offline. Prints counts,
how long detection took against 1.5 x keep-alive, and the resident memory of the broker, the
fleet service and the simulators. Timing is printed, never asserted.

Takes about a minute here; runs by default unless FLEET_SCALE_SKIP=1 (see README).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from appliance.sync.broker import Broker
from central.fleet.registry import Fleet
from central.fleet.store import FleetStore
from central.home import Home
from linerec_contract.durable import atomic_write
from linerec_contract.pki import key_pem, new_tls_key, sign_request

BOXES = int(os.environ.get("FLEET_SCALE_BOXES", "500"))
PER_PROCESS = 100
KEEPALIVE_S = 5
INTERVAL_S = 5.0
SIM = Path(__file__).with_name("simfleet.py")

pytestmark = pytest.mark.skipif(os.environ.get("FLEET_SCALE_SKIP") == "1",
                                reason="FLEET_SCALE_SKIP=1")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fleet_ls(home: Path) -> list[dict[str, object]]:
    out = subprocess.run([sys.executable, "-m", "central", "--home", str(home), "fleet", "ls",
                          "--json"], capture_output=True, text=True, timeout=120, check=True)
    rows: list[dict[str, object]] = json.loads(out.stdout)
    return rows


def fresh(row: dict[str, object]) -> bool:
    age = row.get("telemetry_age_s")
    return isinstance(age, float | int) and age <= 3 * INTERVAL_S


def test_500_boxes_and_100_silent_ones_go_offline(tmp_path: Path, home: Home, fleet: Fleet,
                                                  broker: Broker) -> None:
    t_start = time.monotonic()
    certs = tmp_path / "certs"
    certs.mkdir()
    devices = [f"sim-{i:04d}" for i in range(BOXES)]
    jobs: list[list[dict[str, str]]] = [[] for _ in range(0, BOXES, PER_PROCESS)]
    for i, dev in enumerate(devices):
        key = new_tls_key()
        cert = sign_request(fleet.pki, dev, key.public_key())
        atomic_write(certs / f"{dev}.key", key_pem(key), mode=0o600)
        atomic_write(certs / f"{dev}.crt", cert.public_bytes(serialization.Encoding.PEM))
        jobs[i // PER_PROCESS].append({"device": dev, "cert": str(certs / f"{dev}.crt"),
                                       "key": str(certs / f"{dev}.key")})
    t_certs = time.monotonic() - t_start

    service_log = tmp_path / "fleet-serve.log"
    with service_log.open("wb") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "central", "--home", str(home.root), "fleet", "serve",
             "--broker", f"{broker.host}:{broker.port}"], stdout=log, stderr=log)
    sims: list[subprocess.Popen[str]] = []
    try:
        deadline = time.monotonic() + 60
        while "fleet service connected" not in service_log.read_text():
            assert service.poll() is None, service_log.read_text()
            assert time.monotonic() < deadline, "fleet service did not connect"
            time.sleep(0.1)
        for n, boxes in enumerate(jobs):
            job = tmp_path / f"job-{n}.json"
            job.write_text(json.dumps({"boxes": boxes, "ca": str(fleet.pki.ca_cert),
                                       "host": broker.host, "port": broker.port,
                                       "keepalive": KEEPALIVE_S, "interval": INTERVAL_S}))
            sims.append(subprocess.Popen([sys.executable, str(SIM), str(job)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True))
        for sim in sims:
            assert sim.stdout is not None
            line = sim.stdout.readline()
            assert line.startswith("connected"), line
        t_connected = time.monotonic() - t_start

        deadline = time.monotonic() + 120
        while True:
            rows = fleet_ls(home.root)
            online_fresh = [r for r in rows if r["state"] == "online" and fresh(r)]
            if len(online_fresh) == BOXES:
                break
            assert time.monotonic() < deadline, f"{len(online_fresh)}/{BOXES} online and fresh"
            time.sleep(1)
        assert sorted(r["device"] for r in rows) == devices
        t_all_fresh = time.monotonic() - t_start

        frozen = sims[0]
        frozen_devices = {b["device"] for b in jobs[0]}
        os.kill(frozen.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        deadline = t_stop + 20 * KEEPALIVE_S  # failure bound only
        # When the fleet store shows them offline (read directly, every 0.1 s)...
        with FleetStore(home.root / "fleet" / "fleet.sqlite") as store:
            while sum(st["state"] == "offline" for st in store.statuses().values()) < \
                    len(frozen_devices):
                assert time.monotonic() < deadline, "the silent boxes never went offline"
                time.sleep(0.1)
        recorded_s = time.monotonic() - t_stop
        # ... and what the operator's command shows.
        while True:
            rows = fleet_ls(home.root)
            offline = {str(r["device"]) for r in rows if r["state"] == "offline"}
            if len(offline) >= len(frozen_devices):
                break
            assert time.monotonic() < deadline, f"{len(offline)} offline"
            time.sleep(0.5)
        detected_s = time.monotonic() - t_stop
        assert offline == frozen_devices  # exactly those, no other box
        online = [r for r in rows if r["state"] == "online"]
        assert len(online) == BOXES - len(frozen_devices)

        broker_pid = broker._proc.pid if broker._proc else 0
        sim_rss = sum(rss_kib(s.pid) for s in sims)
        print(f"\nfleet scale: {BOXES} boxes ({len(sims)} simulator processes), "
              f"{len(online)} online, {len(offline)} offline after freezing {len(frozen_devices)}")
        print(f"  certificates issued in {t_certs:.1f} s; all connected at {t_connected:.1f} s; "
              f"all online with fresh telemetry at {t_all_fresh:.1f} s")
        print(f"  silent boxes recorded offline {recorded_s:.1f} s after they fell silent, "
              f"shown by fleet ls at {detected_s:.1f} s (keep-alive {KEEPALIVE_S} s: mosquitto "
              f"gives up on a silent client after 1.5 x = {1.5 * KEEPALIVE_S:.1f} s)")
        print(f"  resident memory: broker {rss_kib(broker_pid) / 1024:.1f} MiB, fleet service "
              f"{rss_kib(service.pid) / 1024:.1f} MiB, simulators {sim_rss / 1024:.1f} MiB total")
    finally:
        for sim in sims:
            os.kill(sim.pid, signal.SIGCONT)
            sim.kill()
            sim.wait()
        service.terminate()
        service.wait(30)
