"""Several receivers, each on a "machine" of its own (its own home: keys, quarantine, staging),
sharing one MQTT broker (real mosquitto, shipped ACL, shared subscription), one S3 bucket
(moto's server mode stands in for S3: no S3 service can run here) and one PostgreSQL index
(a private server from Debian's postgresql-15). One receiver is SIGKILLed mid-run and started
again. Every segment must be stored exactly once (one object version each), acked, indexed
once, and the audit clean.

Sizes: ``CENTRAL_SCALEOUT_RECEIVERS`` (default 3) and ``CENTRAL_SCALEOUT_SEGMENTS`` per box
(default 40; the full run of the issue is 200:
``CENTRAL_SCALEOUT_SEGMENTS=200 .venv/bin/python -m pytest tests/central/test_central_scaleout_backends.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.sync.broker import Broker
from central.home import Home, init_home
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import Pki, ensure_pki
from linerec_contract.protocol import Ack, ack_topic, segment_topic
from linerec_contract.segment import encode_wire

from .central_helpers import Box, known_signal
from .s3_server import S3Stand

RECEIVERS = int(os.environ.get("CENTRAL_SCALEOUT_RECEIVERS", "3"))
SEGMENTS = int(os.environ.get("CENTRAL_SCALEOUT_SEGMENTS", "40"))
BOXES = [f"box-{i}" for i in range(5)]
RESEND_AFTER_S = 15.0  # the boxes' ack timeout: unacked segments are published again
WINDOW = 8  # unacknowledged segments per box, as the uplink's default window
REPO = Path(__file__).resolve().parents[2]


class Receiver:
    """``appliance-central serve`` on one machine's home; its log lines are kept."""

    def __init__(self, home: Home, name: str) -> None:
        self.home, self.name = home, name
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "central", "--home", str(self.home.root), "serve"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        ready = threading.Event()
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.lines.append(line)
                # A restarted receiver's session is kept: it may work off its queue first.
                if "subscribed to" in line or "session present: True" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(30), f"{self.name} did not subscribe:\n{''.join(self.lines[-20:])}"

    def stored(self) -> int:
        return sum(1 for ln in self.lines if re.search(r"/seg/\d+ stored ", ln))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        code = self.proc.wait(30)
        if self.proc.stderr is not None:
            time.sleep(0.2)
        return code


class BoxLink:
    """A box's MQTT connection with its own certificate: publishes, collects acks."""

    def __init__(self, broker: Broker, pki: Pki, dev: str) -> None:
        self.dev = dev
        self.acks: dict[int, list[str]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(str(pki.ca_cert), str(pki.client_cert(dev)),
                            str(pki.client_key(dev)))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_ack
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(ack_topic(dev), qos=1)
        assert subscribed.wait(10)

    def _on_ack(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ack = Ack.decode(msg.payload)
        with self.lock:
            self.acks.setdefault(ack.seq, []).append(ack.result)

    def done(self) -> set[int]:
        with self.lock:
            return {s for s, r in self.acks.items() if {"stored", "duplicate"} & set(r)}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("receivers", [RECEIVERS])
def test_receivers_share_broker_s3_and_postgresql(
        receivers: int, tmp_path: Path, s3_server: S3Stand, pg_dsn: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (scripts/bootstrap.sh installs it)")
    # One certificate per receiver machine: the broker makes a certificate's CN its client id.
    machines = tuple(f"central-machine-{i}" for i in range(receivers))
    pki = ensure_pki(tmp_path / "pki", [*machines, *BOXES])
    broker = Broker(tmp_path / "broker", pki, central_users=machines)
    broker.start()
    bucket = s3_server.bucket(object_lock=True)

    first = init_home(tmp_path / "machine-0")
    keys = {dev: DeviceKey.generate() for dev in BOXES}
    for dev, key in keys.items():
        first.enroll(dev, key.public_b64)
    first.share_group()  # the receivers' secret group, copied to every machine with the keys
    homes = [first] + [Home(Path(shutil.copytree(first.root, tmp_path / f"machine-{i}")))
                       for i in range(1, receivers)]
    for i, home in enumerate(homes):
        home.config_path.write_text(
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nca = "{pki.ca_cert}"\n'
            f'cert = "{pki.client_cert(machines[i])}"\nkey = "{pki.client_key(machines[i])}"\n'
            f'[receiver]\nclient_id = "{machines[i]}"\n'
            + s3_server.toml(bucket) + f'[index]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\n')

    wires: dict[str, list[bytes]] = {}
    for n, dev in enumerate(BOXES):
        box = Box(dev, keys[dev], first.recipients())
        for seq in range(SEGMENTS):
            box.seal_call(f"c{seq}", known_signal(240, seed=n * 1000 + seq), 1)
        wires[dev] = [encode_wire(seg) for seg in box.sealed]
    total = len(BOXES) * SEGMENTS

    running = [Receiver(home, f"receiver-{i}") for i, home in enumerate(homes)]
    links: list[BoxLink] = []
    killed = None
    try:
        for r in running:
            r.start()
        links = [BoxLink(broker, pki, dev) for dev in BOXES]
        sent_at: dict[tuple[str, int], float] = {}
        deadline = time.monotonic() + 60 + 2 * total
        victim = running[min(1, receivers - 1)]
        while True:
            done = sum(len(link.done()) for link in links)
            if killed is None and done >= total // 3:
                killed = done
                assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
                time.sleep(1.0)
                victim.start()
            if done == total:
                break
            assert time.monotonic() < deadline, f"only {done} of {total} acked"
            now = time.monotonic()
            for link in links:  # like the box's uplink: a window, and resends after a timeout
                acked = link.done()
                unacked = [s for s in range(SEGMENTS) if s not in acked]
                for seq in unacked[:WINDOW]:
                    if now - sent_at.get((link.dev, seq), -1e9) > RESEND_AFTER_S:
                        link.client.publish(segment_topic(link.dev, seq), wires[link.dev][seq],
                                            qos=1)
                        sent_at[(link.dev, seq)] = now
            time.sleep(0.05)
    finally:
        for link in links:
            link.close()
        codes = [r.stop() for r in running]
        broker.stop()
    assert codes == [0] * receivers, codes

    # Every segment acked, none rejected.
    results = Counter(r for link in links for rs in link.acks.values() for r in rs)
    assert results["rejected"] == 0, results
    # Exactly once in the bucket: one version of each object, no delete markers.
    s3 = s3_server.client()
    versions: Counter[str] = Counter()
    markers = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        versions.update(v["Key"] for v in page.get("Versions", []))
        markers += len(page.get("DeleteMarkers", []))
    want = {f"{dev}/{seq:012d}{ext}" for dev in BOXES for seq in range(SEGMENTS)
            for ext in (".age", ".manifest.json")}
    assert set(versions) == want and set(versions.values()) == {1} and markers == 0
    # The shared index and the audit, from any machine.
    audit = subprocess.run([sys.executable, "-m", "central", "--home", str(first.root), "verify",
                            "--json"], capture_output=True, text=True, cwd=REPO, check=False)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], audit.stdout[-2000:]
    assert report["segments"] == total and report["index_issues"] == []
    assert all(not any(h.quarantine_dir.iterdir()) for h in homes)
    per_receiver = [r.stored() for r in running]
    with capsys.disabled():
        # Duplicates: redeliveries after the kill, resends of segments unacked after 15 s.
        print(f"\n{receivers} receivers, {len(BOXES)} boxes x {SEGMENTS} segments, S3 (moto) + "
              f"PostgreSQL: acks {dict(results)}; stored per receiver {per_receiver}; "
              f"{victim.name} SIGKILLed after {killed} acks and restarted")
    assert all(n > 0 for n in per_receiver), per_receiver
    # A receiver killed between its store and its log line stored one segment it never logged
    # (its redelivery was a duplicate): at most one per kill, as handle() takes one at a time.
    assert total - 1 <= sum(per_receiver) <= total, per_receiver
