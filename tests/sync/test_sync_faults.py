"""Fault test: real processes, a real mosquitto and a TCP proxy under the test's control.

Real sealed segments (signed, chained, age-encrypted) go from a real outbox through the real
uplink stage process (``appliance stage uplink``), through the proxy, to a real mosquitto and a
real central receiver process (``appliance-central serve``), or over HTTPS to a real
``appliance-central serve-https`` process, while the test injects faults:

* connections cut at random byte offsets (the proxy resets both sides after N more bytes);
* the broker SIGKILLed and restarted (MQTT only);
* the central receiver SIGKILLed between store and ack (its fault-injection countdown
  ``APPLIANCE_CENTRAL_KILL_AFTER_STORE``) and restarted;
* the HTTPS server SIGKILLed at a random moment (HTTPS only);
* the box's uplink SIGKILLed mid-upload and restarted.

At the end central holds every segment exactly once, ``appliance-central verify`` exits 0 (every
signature, hash and chain link checks, no gap), nothing is quarantined, and the outbox is empty.
Nothing here asserts how fast anything happens.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.sync.broker import Broker, free_port
from appliance.sync.outbox import Outbox
from central.home import Home, init_home
from central.receiver import FAILPOINT_ENV
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import Pki

from .helpers import add_wire_segment, seal_chain
from .proxy import Proxy

DEVICE = "box1"
MIN_FAULTS = 50
DRAIN_TIMEOUT_S = 150.0  # failure bound only
SEED = int(os.environ.get("APPLIANCE_FAULT_SEED", "20240506"))


class Proc:
    """A child process that can be SIGKILLed and started again, logging to a file."""

    def __init__(self, name: str, argv_env: Callable[[], tuple[list[str], dict[str, str]]],
                 logs: Path) -> None:
        self.name, self._argv_env, self.logs = name, argv_env, logs
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        argv, env = self._argv_env()
        self.starts += 1
        log = (self.logs / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, **env},
                                     start_new_session=True)
        log.close()

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        text = (self.logs / f"{self.name}.log").read_text(errors="replace")
        return f"--- {self.name} ---\n{text[-3000:]}"


class Rig:
    """The box side (outbox + uplink process) and central (home + receiver process)."""

    def __init__(self, tmp: Path, pki: Pki, transport: str, count: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.pki = pki
        self.transport = transport
        self.home: Home = init_home(tmp / "central")
        key = DeviceKey.generate()
        self.home.enroll(DEVICE, key.public_b64)
        self.wires = seal_chain(DEVICE, key, self.home.recipients(), count, seed=seed)
        self.state = tmp / "box"
        self.outbox = Outbox(self.state / "outbox")
        self.faults: Counter[str] = Counter()
        self.kill_countdown = True
        self.broker: Broker | None = None
        if transport == "mqtt":
            self.broker = Broker(tmp / "broker", pki, autosave_interval_s=1)
            self.broker.start()
            self.central_port = self.broker.port
        else:
            self.central_port = free_port()
        self.proxy = Proxy("127.0.0.1", self.central_port)
        self.config = tmp / "box.toml"
        self.config.write_text(
            f'[device]\nid = "{DEVICE}"\n[paths]\nstate_dir = "{self.state}"\n'
            f'[uplink]\ntransport = "{transport}"\nhost = "127.0.0.1"\nport = {self.proxy.port}\n'
            f'ca = "{pki.ca_cert}"\ncert = "{pki.client_cert(DEVICE)}"\n'
            f'key = "{pki.client_key(DEVICE)}"\nwindow = 8\nack_timeout_s = 2.0\n'
            f'chunk_bytes = 4096\n')
        self.central = Proc("central", self._central_argv, self.logs)
        self.box = Proc("uplink", lambda: ([sys.executable, "-m", "appliance", "stage", "uplink",
                                            "--config", str(self.config)], {}), self.logs)

    def _central_argv(self) -> tuple[list[str], dict[str, str]]:
        env = {FAILPOINT_ENV: str(self.rng.randint(3, 25)) if self.kill_countdown else ""}
        base = [sys.executable, "-m", "central", "--home", str(self.home.root)]
        pki = self.pki
        if self.transport == "mqtt":
            return [*base, "serve", "--host", "127.0.0.1", "--port", str(self.central_port),
                    "--ca", str(pki.ca_cert), "--cert", str(pki.client_cert("central")),
                    "--key", str(pki.client_key("central"))], env
        return [*base, "serve-https", "--port", str(self.central_port), "--ca", str(pki.ca_cert),
                "--cert", str(pki.server_cert), "--key", str(pki.server_key)], env

    def close(self) -> None:
        self.box.stop()
        self.central.stop()
        self.proxy.close()
        if self.broker is not None:
            self.broker.stop()

    # -- faults ------------------------------------------------------------------------------

    def watch_central(self) -> None:
        """Restart central when its store/ack countdown killed it (counted as that fault)."""
        rc = self.central.poll()
        if rc is None:
            return
        assert rc == -signal.SIGKILL, f"central exited with {rc}\n{self.central.tail()}"
        self.faults["central killed between store and ack"] += 1
        self.central.start()

    def inject(self) -> None:
        kinds = ["cut at random byte offset", "uplink killed mid-upload"]
        weights = [5, 2]
        if self.transport == "mqtt":
            kinds.append("broker killed and restarted")
        else:
            kinds.append("https server killed at a random moment")
        weights.append(2)
        kind = self.rng.choices(kinds, weights)[0]
        if kind.startswith("cut"):
            # Counted when the proxy actually cuts (an armed connection may close first).
            self.proxy.cut_at_random_offsets(self.rng, max_offset=48 * 1024)
            return
        elif kind.startswith("uplink"):
            if not self.outbox.pending():
                return
            self.box.kill()
            self.box.start()
        elif kind.startswith("broker"):
            assert self.broker is not None
            self.broker.kill()
            time.sleep(self.rng.uniform(0.0, 0.5))
            self.broker.start()
        else:
            self.central.kill()
            self.central.start()
        self.faults[kind] += 1

    def total_faults(self) -> int:
        self.faults["connection cut at random byte offset"] = self.proxy.cuts
        return sum(self.faults.values())

    # -- the run -----------------------------------------------------------------------------

    def run(self, min_faults: int) -> None:
        count = len(self.wires)
        batches = max(min_faults, 1)
        per_batch = max(1, -(-count // batches))
        added = 0
        while added < count or self.total_faults() < min_faults:
            for wire in self.wires[added:added + per_batch]:
                add_wire_segment(self.outbox, wire)
            added = min(count, added + per_batch)
            time.sleep(self.rng.uniform(0.1, 0.6))
            self.watch_central()
            self.inject()
        self.kill_countdown = False  # the last central runs to the end
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.outbox.pending():
            self.watch_central()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"outbox not drained: {len(self.outbox.pending())} left, faults "
                    f"{dict(self.faults)}\n{self.central.tail()}\n{self.box.tail()}")
            time.sleep(0.2)

    def check(self) -> dict[str, object]:
        count = len(self.wires)
        store = Store(self.home)
        seqs = [ref.seq for ref in store.iter_refs(DEVICE)]
        assert seqs == list(range(count)), "central does not hold every segment exactly once"
        assert store.quarantine_entries() == []
        assert self.outbox.pending() == [] and self.outbox.rejected() == []
        assert self.outbox.prepared() == []
        verify = subprocess.run([sys.executable, "-m", "central", "--home", str(self.home.root),
                                 "verify"], capture_output=True, text=True, timeout=120,
                                check=False)
        assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
        total = self.total_faults()
        return {"transport": self.transport, "segments": count,
                "bytes": sum(map(len, self.wires)), "faults": dict(self.faults),
                "faults_total": total, "proxy_connections": self.proxy.connections,
                "uplink_starts": self.box.starts,
                "central_starts": self.central.starts}


def _run(tmp_path: Path, pki: Pki, transport: str, count: int,
         capsys: pytest.CaptureFixture[str]) -> None:
    rig = Rig(tmp_path, pki, transport, count, SEED)
    try:
        rig.run(MIN_FAULTS)
        report = rig.check()
    finally:
        rig.close()
    with capsys.disabled():
        print(f"\nfault test: {json.dumps(report, sort_keys=True)}")
    assert rig.total_faults() >= MIN_FAULTS
    assert rig.faults["central killed between store and ack"] > 0
    assert rig.faults["uplink killed mid-upload"] > 0


def test_mqtt_every_segment_exactly_once_through_faults(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, pki, "mqtt", 1000, capsys)


def test_https_every_segment_exactly_once_through_faults(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, pki, "https", 1000, capsys)
