"""A compromised box attacks central's MQTT intake; the honest box is not stopped, nothing fills.

Real mosquitto with the shipped config and ACL (appliance.sync.broker), real receiver process
(``appliance-central serve``), real certificates from one fleet CA: ``box-1`` is honest,
``box-evil`` is enrolled but compromised (it holds a valid certificate and its own key),
``box-stranger`` has a fleet certificate but was never enrolled. The honest box is a light
simulated box (pre-sealed segments, retransmission like the outbox), not a recorder.

The test prints what it sent and what happened. Bounds come from central.toml ``[limits]``
(set small here); memory is the receiver's own VmHWM from /proc, compared with its peak after
the same honest traffic without an attack, in the same run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.sync.broker import Broker
from central.home import Home, init_home
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import ensure_pki
from linerec_contract.protocol import (
    CHUNK_PROP,
    CHUNK_SHA_PROP,
    CHUNK_SIZE_PROP,
    MAX_PACKET_BYTES,
    segment_topic,
)
from linerec_contract.segment import encode_wire

from .central_helpers import Box, known_signal
from .mqtt_support import LightBox, ReceiverProcess, mqtt_client

MIB = 1024 * 1024
LIMITS = {"quarantine_mb": 4, "quarantine_device_mb": 2, "quarantine_entries": 400,
          "quarantine_device_entries": 60, "staging_mb": 6, "staging_device_mb": 3}
MEMORY_BOUND_KIB = 16 * 1024  # growth allowed over the honest-traffic peak: 16 MQTT messages


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


class Sampler(threading.Thread):
    """Records the largest quarantine and staging sizes seen while the attack runs."""

    def __init__(self, home: Home) -> None:
        super().__init__(daemon=True)
        self.home = home
        self.stop = threading.Event()
        self.max_quarantine = self.max_evil_quarantine = self.max_staging = self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.max_quarantine = max(self.max_quarantine, _tree_bytes(self.home.quarantine_dir))
            self.max_evil_quarantine = max(self.max_evil_quarantine,
                                           _tree_bytes(self.home.quarantine_dir / "box-evil"))
            self.max_staging = max(self.max_staging, _tree_bytes(self.home.root / "incoming"))
            self.samples += 1


class Attacker:
    """box-evil's connection; every message is recorded with a label for the report."""

    def __init__(self, broker: Broker, name: str = "box-evil") -> None:
        self.broker, self.name = broker, name
        self.sent: dict[str, int] = {}
        self.client = mqtt_client(broker, name)

    def send(self, label: str, topic: str, payload: bytes,
             props: list[tuple[str, str]] | None = None) -> None:
        properties = None
        if props is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = props
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        self.sent[label] = self.sent.get(label, 0) + 1
        if len(payload) <= MAX_PACKET_BYTES:
            info.wait_for_publish(10)

    def reconnect(self) -> None:
        self.client.loop_stop()
        self.client = mqtt_client(self.broker, self.name)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _props(chunk: str, sha: str = "ab" * 32, size: str = "5000") -> list[tuple[str, str]]:
    return [(CHUNK_PROP, chunk), (CHUNK_SHA_PROP, sha), (CHUNK_SIZE_PROP, size)]


# _poison sends 15 messages; the one with an extra topic level matches no subscription of
# central, so the broker never delivers it.
POISON_DELIVERED = 14


def _settled(receiver: ReceiverProcess, counter: str, expected: int) -> dict[str, int]:
    """The receiver's counters once ``counter`` reached ``expected`` (status file, 1 s cadence)."""
    counts: dict[str, int] = {}
    for _ in range(300):
        counts = receiver.counts()
        if counts.get(counter, 0) >= expected:
            return counts
        time.sleep(0.1)
    return counts


def _poison(attacker: Attacker, evil: Box, seq_base: int) -> None:
    """Messages that used to stop the intake: fields that are no protocol values."""
    t = f"rec/v1/{evil.device_id}/seg"
    attacker.send("topic seq '\u00b2' (passes str.isdigit)", f"{t}/\u00b2", b"x" * 100)
    attacker.send("topic seq Arabic-Indic '\u0663'", f"{t}/\u0663", b"x")
    attacker.send("topic seq -1", f"{t}/-1", b"x")
    attacker.send("topic seq beyond the maximum (10^12)", f"{t}/1000000000000", b"x")
    attacker.send("topic seq with leading zero", f"{t}/0{seq_base}", b"x")
    attacker.send("topic with extra level", f"{t}/{seq_base}/x", b"x")
    attacker.send("chunk '0/\u00b2'", f"{t}/{seq_base}", b"x", _props("0/\u00b2"))
    attacker.send("chunk '\u00b2/3'", f"{t}/{seq_base}", b"x", _props("\u00b2/3"))
    attacker.send("chunk count 10^20", f"{t}/{seq_base}", b"x", _props("0/" + "9" * 20))
    attacker.send("chunk index -1 (negative offset)", f"{t}/{seq_base}", b"x", _props("-1/3"))
    attacker.send("chunk index = count", f"{t}/{seq_base}", b"x", _props("3/3"))
    attacker.send("seg-bytes 10^15", f"{t}/{seq_base}", b"x", _props("0/3", size="9" * 15))
    attacker.send("seg-bytes '\u00b2'", f"{t}/{seq_base}", b"x", _props("0/3", size="\u00b2"))
    attacker.send("seg-sha256 not hex", f"{t}/{seq_base}", b"x", _props("0/3", sha="zz" * 32))
    attacker.send("chunk property twice", f"{t}/{seq_base}", b"x",
                  [*_props("0/3"), (CHUNK_PROP, "1/3")])


def test_compromised_box_cannot_stop_or_fill_central(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    pki = ensure_pki(tmp_path / "pki", ["central", "box-1", "box-evil", "box-stranger"])
    home = init_home(tmp_path / "central")
    (home.root / "central.toml").write_text(
        "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in LIMITS.items()))
    honest = Box("box-1", DeviceKey.generate(), home.recipients())
    evil = Box("box-evil", DeviceKey.generate(), home.recipients())
    stranger = Box("box-stranger", DeviceKey.generate(), home.recipients())
    home.enroll("box-1", honest.key.public_b64)
    home.enroll("box-evil", evil.key.public_b64)
    # Honest segments: small ones (one message) and larger ones (chunked, 4 KiB chunks).
    segs = []
    for n in range(48):
        frames = 800 if n % 2 else 12000
        segs += honest.seal_call(f"call-{n}", known_signal(frames, seed=n), 1)
    evil_segs = evil.seal_call("e", known_signal(800), 4)
    stranger_segs = stranger.seal_call("s", known_signal(800), 20)

    broker = Broker(tmp_path / "broker", pki)
    broker.start()
    receiver = ReceiverProcess(home.root, broker, "central", tmp_path)
    box = attacker = None
    report: list[str] = []
    try:
        receiver.start()
        box = LightBox(broker, "box-1", chunk_bytes=4096)
        # 1. Honest traffic alone: the memory reference of this run.
        box.send_all(segs[:12])
        assert all(box.acked(s) for s in segs[:12])
        reference_kib = receiver.vm_hwm_kib()

        # 2. The attack, while the honest box keeps sending.
        sampler = Sampler(home)
        sampler.start()
        # Connecting under the receiver's client id, to take over its session: the broker
        # names the client after its certificate instead, and the receiver stays connected.
        impostor = mqtt_client(broker, "box-evil", client_id=receiver.client_id)
        impostor.subscribe("$share/central/rec/v1/+/seg/+", qos=1)
        time.sleep(0.5)
        impostor.disconnect()
        impostor.loop_stop()
        attacker = Attacker(broker)
        attacker.sent[f"connect as client id {receiver.client_id!r} with box-evil's cert"] = 1
        honest_thread = threading.Thread(target=box.send_all, args=(segs[12:30],), daemon=True)
        honest_thread.start()
        _poison(attacker, evil, 5)
        attacker.send("garbage segment", segment_topic("box-evil", 0), os.urandom(3000))
        attacker.send("truncated segment", segment_topic("box-evil", 1),
                      encode_wire(evil_segs[1])[:-100])
        attacker.send("box-1's segment replayed under box-evil's topic",
                      segment_topic("box-evil", 2), encode_wire(segs[2]))
        attacker.send("box-evil publishing on box-1's topic (ACL)", segment_topic("box-1", 200),
                      encode_wire(evil_segs[0]))
        attacker.send("oversized chunked segment (200 MiB announced)",
                      segment_topic("box-evil", 3), b"x" * 1000,
                      _props("0/200", size=str(200 * MIB)))
        # Joining central's shared group under a guessable name: no segment may be taken away.
        attacker.client.subscribe("$share/central/rec/v1/+/seg/+", qos=1)
        attacker.sent["subscribe $share/central/rec/v1/+/seg/+"] = 1
        for n in range(40):  # partial segments that never complete: staging flood
            attacker.send("partial segment flood (1 of 16 chunks of 64 KiB)",
                          segment_topic("box-evil", 100 + n), os.urandom(64 * 1024),
                          [(CHUNK_PROP, "0/16"), (CHUNK_SHA_PROP, hashlib.sha256(
                              str(n).encode()).hexdigest()), (CHUNK_SIZE_PROP, str(MIB))])
        # A complete chunked segment of garbage, announced honestly (size and SHA-256 match):
        # joined on disk, read once, rejected; larger than the quarantine's per-device bound,
        # so only its reason is kept.
        blob = os.urandom(5 * MIB // 2)
        sha = hashlib.sha256(blob).hexdigest()
        count = len(blob) // (64 * 1024)
        for index in range(count):
            part = blob[index * 64 * 1024:(index + 1) * 64 * 1024]
            attacker.send("complete chunked garbage segment, 2.5 MiB (chunks)",
                          segment_topic("box-evil", 4), part,
                          [(CHUNK_PROP, f"{index}/{count}"), (CHUNK_SHA_PROP, sha),
                           (CHUNK_SIZE_PROP, str(len(blob)))])
        for n in range(24):  # one full-size message after another: quarantine flood
            attacker.send("flood of 1 MiB garbage messages", segment_topic("box-evil", 1000 + n),
                          os.urandom(MAX_PACKET_BYTES - 32 * 1024))
        attacker.send("message over the broker's packet limit", segment_topic("box-evil", 9),
                      os.urandom(MAX_PACKET_BYTES + 1024))
        time.sleep(0.5)
        attacker.reconnect()  # the broker disconnected it for the oversized packet
        outsider = Attacker(broker, "box-stranger")
        for seg in stranger_segs:
            outsider.send("segments from a box that is not enrolled",
                          segment_topic("box-stranger", seg.seq), encode_wire(seg))
        outsider.close()
        honest_thread.join(120)
        assert all(box.acked(s) for s in segs[12:30]), "honest box stalled during the attack"
        # Every attack message has been handled once the stranger's last one is counted.
        counts_before_restart = _settled(receiver, "not_enrolled", len(stranger_segs))
        attack_peak_kib = receiver.vm_hwm_kib()
        alive = receiver.proc is not None and receiver.proc.poll() is None
        log_before_kill = receiver.log_text()

        # 3. Receiver killed; poison waits in its persistent session; it must not stop it twice.
        receiver.kill()
        _poison(attacker, evil, 7)
        for seg in segs[30:36]:
            box.publish(seg)
        receiver.start()
        box.send_all(segs[30:])
        assert all(box.acked(s) for s in segs), "honest box stalled after the restart"
        counts_after_restart = _settled(receiver, "malformed", POISON_DELIVERED)
        sampler.stop.set()
        sampler.join(5)

        store = Store(home)
        report.append(f"{'attack':<58} sent")
        all_sent = dict(attacker.sent)
        for label, count in {**all_sent, "segments from a box that is not enrolled":
                             len(stranger_segs)}.items():
            report.append(f"  {label:<56} {count}")
        report.append(f"receiver counters before the restart: {counts_before_restart}")
        report.append(f"receiver counters after the restart:  {counts_after_restart}")
        report.append(f"honest segments stored: {len(list(store.iter_refs('box-1')))} of "
                      f"{len(segs)}; acks received: {box.ack_count}")
        report.append(f"quarantine max {sampler.max_quarantine} B (bound {LIMITS['quarantine_mb']} "
                      f"MiB), box-evil max {sampler.max_evil_quarantine} B (bound "
                      f"{LIMITS['quarantine_device_mb']} MiB), entries now "
                      f"{len(store.quarantine_entries())}")
        report.append(f"staging max {sampler.max_staging} B (bound {LIMITS['staging_device_mb']} "
                      f"MiB per device) over {sampler.samples} samples")
        report.append(f"receiver VmHWM: {reference_kib} kB after honest traffic, "
                      f"{attack_peak_kib} kB after the attack (+{attack_peak_kib - reference_kib}"
                      f" kB; bound +{MEMORY_BOUND_KIB} kB)")
        print("\n".join(report))

        assert alive, "the receiver died during the attack"
        assert sorted(r.seq for r in store.iter_refs("box-1")) == [s.seq for s in segs]
        assert not store.exists("box-1", 200)
        for seg in segs:
            assert store.load("box-1", seg.seq).manifest_sha256 == seg.manifest_sha256
        assert list(store.iter_refs("box-evil")) == []
        assert not (home.quarantine_dir / "box-stranger").exists()
        assert counts_before_restart["not_enrolled"] == len(stranger_segs)
        poison = POISON_DELIVERED
        assert counts_before_restart["malformed"] == poison
        assert counts_before_restart["chunks_refused"] == 1  # the oversized segment
        assert counts_before_restart["partial_dropped"] >= 40 - 3  # 3 of 1 MiB fit in 3 MiB
        assert counts_before_restart["rejected"] == 3 + 1 + 24
        assert counts_before_restart["quarantine_truncated"] == 1
        assert counts_before_restart["quarantine_dropped"] >= 24 - 2  # 2 of ~1 MiB fit in 2 MiB
        assert counts_before_restart["failed"] == 0
        assert counts_before_restart["reconnects"] == 0
        assert "disconnected from" not in log_before_kill
        # the poison left in the persistent session was consumed by the restarted receiver
        assert counts_after_restart["malformed"] == poison
        assert sampler.max_evil_quarantine <= LIMITS["quarantine_device_mb"] * MIB
        assert sampler.max_quarantine <= LIMITS["quarantine_mb"] * MIB
        assert sampler.max_staging <= LIMITS["staging_device_mb"] * MIB + 64 * 1024
        assert attack_peak_kib - reference_kib <= MEMORY_BOUND_KIB
        assert "Traceback" not in receiver.log_text()
        audit = subprocess.run([sys.executable, "-m", "central", "--home", str(home.root),
                                "verify", "--device", "box-1"], capture_output=True, text=True,
                               check=False)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        for closer in (box, attacker):
            if closer is not None:
                closer.close()
        receiver.stop()
        broker.stop()
