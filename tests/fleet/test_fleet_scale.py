"""Scale: 500 simulated boxes against one mosquitto with the shipped configuration.

Light agents (tests/fleet/simfleet.py, 100 MQTT clients per process, each box with its own
client certificate from the fleet CA) publish the real status/will, telemetry and heartbeats;
central's real fleet service (``appliance-central fleet serve``) records them; ``fleet ls
--json`` must show every box online with fresh telemetry. Then two faults, 100 boxes each:

- one simulator process is SIGKILLed: the kernel closes its 100 connections, the broker
  publishes their last wills, and exactly those 100 must be recorded offline (reason ``will``);
- another is frozen (SIGSTOP: its connections stay open but fall silent, as when a site's link
  dies without a FIN): central's own sweep must record exactly those 100 offline (reason
  ``silent``) before the broker gives up on them (1.5 x keep-alive); when the broker's wills
  for them come, the first offline time is kept.

"Within the keep-alive" is asserted on timestamps of events, not on how long the test ran: the
time the fleet store recorded each box offline is compared with the time of the fault (and with
the box's last message) against the configured keep-alive, the protocol's bound (MQTT's
keep-alive; docs/protocol.md, "Liveness"). Counts, delays and the resident memory of the
broker, the fleet service and the simulators are printed.

Takes about a minute here; runs by default unless FLEET_SCALE_SKIP=1 (see README).
"""

from __future__ import annotations

import json
import os
import re
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
from linerec_contract.fleet_protocol import SILENCE_FRACTION
from linerec_contract.pki import key_pem, new_tls_key, sign_request

BOXES = int(os.environ.get("FLEET_SCALE_BOXES", "500"))
PER_PROCESS = 100
KEEPALIVE_S = 8
INTERVAL_S = 4.0
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


def wait_offline(store: FleetStore, count: int, bound: float) -> dict[str, dict[str, object]]:
    """The statuses once ``count`` boxes are offline (read directly, every 0.1 s)."""
    while True:
        statuses = store.statuses()
        if sum(st["state"] == "offline" for st in statuses.values()) >= count:
            return statuses
        assert time.monotonic() < bound, "the boxes never went offline"
        time.sleep(0.1)


def test_500_boxes_100_disconnected_and_100_silent_go_offline_within_the_keepalive(
        tmp_path: Path, home: Home, fleet: Fleet, broker: Broker) -> None:
    t_start = time.monotonic()
    certs = tmp_path / "certs"
    certs.mkdir()
    devices = [f"sim-{i:04d}" for i in range(BOXES)]
    jobs: list[list[dict[str, str]]] = [[] for _ in range(0, BOXES, PER_PROCESS)]
    assert len(jobs) >= 3, "FLEET_SCALE_BOXES: at least 201 boxes (three simulator processes)"
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
        assert {r["keepalive_s"] for r in rows} == {KEEPALIVE_S}
        t_all_fresh = time.monotonic() - t_start
        # Let a few heartbeat rounds pass with every box alive: none may be judged silent.
        time.sleep(KEEPALIVE_S)
        assert "recorded offline" not in service_log.read_text()

        store = FleetStore(home.root / "fleet" / "fleet.sqlite")
        # 1. Disconnect: SIGKILL one simulator; the kernel closes its 100 connections.
        killed = {b["device"] for b in jobs[0]}
        t_kill = time.time()
        os.kill(sims[0].pid, signal.SIGKILL)
        sims[0].wait()
        statuses = wait_offline(store, len(killed), time.monotonic() + 20 * KEEPALIVE_S)
        offline = {d for d, st in statuses.items() if st["state"] == "offline"}
        assert offline == killed  # exactly those, no other box
        will_delays = []
        for dev in killed:
            st = statuses[dev]
            assert st["offline_reason"] == "will", st
            # Protocol bound: recorded after the fault, within the keep-alive of it.
            assert t_kill <= st["offline_at"] <= t_kill + KEEPALIVE_S, st
            will_delays.append(st["offline_at"] - t_kill)
        rows = fleet_ls(home.root)
        assert {str(r["device"]) for r in rows if r["state"] == "offline"} == killed
        assert sum(r["state"] == "online" for r in rows) == BOXES - len(killed)
        after_kill = (len(killed), sum(r["state"] == "online" for r in rows))

        # 2. Silence: SIGSTOP another; its connections stay open, nothing more comes.
        frozen = {b["device"] for b in jobs[1]}
        t_stop = time.time()
        os.kill(sims[1].pid, signal.SIGSTOP)
        statuses = wait_offline(store, len(killed) + len(frozen),
                                time.monotonic() + 20 * KEEPALIVE_S)
        offline = {d for d, st in statuses.items() if st["state"] == "offline"}
        assert offline == killed | frozen  # exactly those
        silent_delays, since_last = [], []
        for dev in frozen:
            st = statuses[dev]
            assert st["offline_reason"] == "silent", st
            # Protocol bound: within the keep-alive of the fault and of the box's last message,
            # and not before central's rule (half the keep-alive without a message) allows.
            assert t_stop <= st["offline_at"] <= t_stop + KEEPALIVE_S, st
            assert st["last_seen"] + SILENCE_FRACTION * KEEPALIVE_S <= st["offline_at"] \
                <= st["last_seen"] + KEEPALIVE_S, st
            silent_delays.append(st["offline_at"] - t_stop)
            since_last.append(st["offline_at"] - st["last_seen"])
        first_offline = {dev: statuses[dev]["offline_at"] for dev in frozen}
        rows = fleet_ls(home.root)
        assert {str(r["device"]) for r in rows if r["state"] == "offline"} == killed | frozen
        online = [r for r in rows if r["state"] == "online"]
        assert len(online) == BOXES - len(killed) - len(frozen)
        # No other box was judged silent at any moment (the service logs each one it marks).
        marked = set(re.findall(r"(sim-\d+): no message for half", service_log.read_text()))
        assert marked == frozen

        # 3. The broker gives up on the frozen connections (1.5 x keep-alive) and publishes
        # their wills: still offline, first recorded time kept (Sparkplug: same boot, session).
        bound = time.monotonic() + 20 * KEEPALIVE_S
        while True:
            statuses = store.statuses()
            if all(statuses[d]["offline_reason"] == "will" for d in frozen):
                break
            assert time.monotonic() < bound, "the broker never published the frozen boxes' wills"
            time.sleep(0.2)
        assert {d: statuses[d]["offline_at"] for d in frozen} == first_offline
        assert {d for d, st in statuses.items() if st["state"] == "offline"} == killed | frozen
        store.close()

        broker_pid = broker._proc.pid if broker._proc else 0
        sim_rss = sum(rss_kib(s.pid) for s in sims[1:])
        print(f"\nfleet scale: {BOXES} boxes ({len(sims)} simulator processes), keep-alive "
              f"{KEEPALIVE_S} s, heartbeat {KEEPALIVE_S / 4:g} s, telemetry {INTERVAL_S:g} s")
        print(f"  certificates issued in {t_certs:.1f} s; all connected at {t_connected:.1f} s; "
              f"all online with fresh telemetry at {t_all_fresh:.1f} s")
        print(f"  SIGKILL of {len(killed)}: {after_kill[0]} offline (will), {after_kill[1]} "
              f"online; recorded offline {min(will_delays):.2f}-{max(will_delays):.2f} s after "
              f"the kill")
        print(f"  SIGSTOP of {len(frozen)}: {len(killed) + len(frozen)} offline, {len(online)} "
              f"online; silent boxes recorded offline {min(silent_delays):.2f}-"
              f"{max(silent_delays):.2f} s after the stop, {min(since_last):.2f}-"
              f"{max(since_last):.2f} s after their last message (bound: keep-alive "
              f"{KEEPALIVE_S} s; broker's own will at 1.5 x = {1.5 * KEEPALIVE_S:g} s)")
        print(f"  resident memory: broker {rss_kib(broker_pid) / 1024:.1f} MiB, fleet service "
              f"{rss_kib(service.pid) / 1024:.1f} MiB, simulators {sim_rss / 1024:.1f} MiB "
              f"({len(sims) - 1} processes left)")
    finally:
        for sim in sims:
            if sim.poll() is None:
                os.kill(sim.pid, signal.SIGCONT)
                sim.kill()
            sim.wait()
            if sim.stdout is not None:
                sim.stdout.close()
        service.terminate()
        service.wait(30)
