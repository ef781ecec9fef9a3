"""Light simulated boxes and real receiver processes for the MQTT intake tests.

A :class:`LightBox` is a box's MQTT connection with its own certificate that publishes
pre-sealed segments (whole or in chunks, as the uplink does) and retransmits what is not acked,
like the outbox; it is not a recorder. :class:`ReceiverProcess` runs ``appliance-central serve``
as its own process, so it can be killed and its memory read from ``/proc``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.sync.broker import Broker
from linerec_contract.protocol import Ack, ChunkInfo, ack_topic, chunk_bounds, segment_topic
from linerec_contract.segment import SealedSegment, encode_wire


def mqtt_client(broker: Broker, name: str, *, client_id: str | None = None) -> mqtt.Client:
    """A connected MQTT v5 client with the certificate of ``name`` (its network loop running)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or name,
                         protocol=mqtt.MQTTv5)
    pki = broker.pki
    client.tls_set(str(pki.ca_cert), str(pki.client_cert(name)), str(pki.client_key(name)))
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert connected.wait(10), f"{name} could not connect"
    return client


def chunk_props(info: ChunkInfo) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = info.user_properties()
    return props


class LightBox:
    """Publishes sealed segments of one device and collects central's acks."""

    def __init__(self, broker: Broker, device: str, *, chunk_bytes: int = 64 * 1024) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.acks: dict[int, Ack] = {}
        self.ack_count = 0
        self._lock = threading.Lock()
        self.client = mqtt_client(broker, device)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_ack
        self.client.subscribe(ack_topic(device), qos=1)
        assert subscribed.wait(10)

    def _on_ack(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        ack = Ack.decode(msg.payload)
        with self._lock:
            self.ack_count += 1
            self.acks[ack.seq] = ack

    def publish(self, seg: SealedSegment) -> None:
        blob = encode_wire(seg)
        bounds = chunk_bounds(len(blob), self.chunk_bytes)
        topic = segment_topic(self.device, seg.seq)
        if len(bounds) == 1:
            self.client.publish(topic, blob, qos=1)
            return
        sha = hashlib.sha256(blob).hexdigest()
        for index, (lo, hi) in enumerate(bounds):
            info = ChunkInfo(index, len(bounds), sha, len(blob))
            self.client.publish(topic, blob[lo:hi], qos=1, properties=chunk_props(info))

    def acked(self, seg: SealedSegment) -> bool:
        ack = self.acks.get(seg.seq)
        return ack is not None and ack.sha256 == seg.payload_sha256 and \
            ack.result in ("stored", "duplicate")

    def send_all(self, segs: list[SealedSegment], *, window: int = 8, ack_timeout_s: float = 5.0,
                 give_up_s: float = 120.0) -> None:
        """Send ``segs`` with at most ``window`` unacknowledged, retransmitting after
        ``ack_timeout_s`` (the outbox's behaviour) until every one is acked or ``give_up_s``."""
        pending = list(segs)
        sent_at: dict[int, float] = {}
        deadline = time.monotonic() + give_up_s
        while pending and time.monotonic() < deadline:
            pending = [s for s in pending if not self.acked(s)]
            now = time.monotonic()
            in_flight = [s for s in pending if now - sent_at.get(s.seq, -1e9) < ack_timeout_s]
            for seg in pending:
                if len(in_flight) >= window:
                    break
                if seg in in_flight:
                    continue
                self.publish(seg)
                sent_at[seg.seq] = now
                in_flight.append(seg)
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ReceiverProcess:
    """``appliance-central --home H serve`` in its own process, logging to a file; it connects
    with the certificate ``client_id`` (the broker makes a certificate's CN the client id)."""

    def __init__(self, home: Path, broker: Broker, client_id: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.home, self.broker, self.client_id = home, broker, client_id
        self.log_path = log_dir / f"{client_id}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        pki = self.broker.pki
        argv = [sys.executable, "-m", "central", "--home", str(self.home), "serve",
                "--host", self.broker.host, "--port", str(self.broker.port),
                "--ca", str(pki.ca_cert), "--cert", str(pki.client_cert(self.client_id)),
                "--key", str(pki.client_key(self.client_id))]
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        if wait:
            self.wait_subscribed()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()[-2000:]
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_start)
                if b"subscribed to" in fh.read():
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.client_id} did not subscribe: {self.log_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def vm_hwm_kib(self) -> int:
        """Peak resident memory of the receiver process so far (kB, /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    def counts(self) -> dict[str, int]:
        path = self.home / "run" / f"receiver-{self.client_id}.json"
        try:
            counts: dict[str, int] = json.loads(path.read_text())["counts"]
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return counts

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
