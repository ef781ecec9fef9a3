"""Three receivers share the intake through an MQTT v5 shared subscription; one is SIGKILLed.

Real mosquitto (shipped config and ACL), three ``appliance-central serve`` processes on one home
(store and index shared), five light simulated boxes (pre-sealed segments, retransmission
after an ack timeout like the outbox; not recorders) with 200 segments each. One receiver is
SIGKILLed mid-run, after it has stored segments, and started again two seconds later (as
systemd would), so what the broker kept in its session is drained. Every segment must be stored exactly
once (one "stored" across all receivers' logs, "duplicate" for any redelivery) and acked, the
audit must be clean, and every receiver must have done work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from appliance.sync.broker import Broker
from central.home import init_home
from central.index import Index
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import ensure_pki

from .central_helpers import Box, known_signal
from .mqtt_support import LightBox, ReceiverProcess

BOXES = 5
SEGMENTS = 200
RECEIVERS = 3
STORED_RE = re.compile(r"(rec/v1/\S+/seg/\d+) stored ")


def _stored_lines(receivers: list[ReceiverProcess]) -> dict[str, Counter[str]]:
    return {r.client_id: Counter(STORED_RE.findall(r.log_text())) for r in receivers}


def test_three_receivers_share_the_load_and_a_killed_one_loses_nothing(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    names = [f"box-{n}" for n in range(BOXES)]
    receiver_ids = tuple(f"central-{n}" for n in range(RECEIVERS))  # a certificate each
    pki = ensure_pki(tmp_path / "pki", [*receiver_ids, *names])
    home = init_home(tmp_path / "central")
    sealed: dict[str, list] = {}
    for name in names:
        box = Box(name, DeviceKey.generate(), home.recipients())
        home.enroll(name, box.key.public_b64)
        for n in range(SEGMENTS):
            box.seal_call(f"c{n}", known_signal(160, seed=n), 1, codec="zstd-pcm")
        sealed[name] = box.sealed
    broker = Broker(tmp_path / "broker", pki, central_users=receiver_ids)
    broker.start()
    receivers = [ReceiverProcess(home.root, broker, cid, tmp_path) for cid in receiver_ids]
    boxes: list[LightBox] = []
    try:
        for receiver in receivers:
            receiver.start()
        boxes = [LightBox(broker, name) for name in names]
        threads = [threading.Thread(target=b.send_all, args=(sealed[b.device],),
                                    kwargs={"ack_timeout_s": 3.0, "give_up_s": 100.0},
                                    daemon=True) for b in boxes]
        for thread in threads:
            thread.start()
        victim = receivers[1]
        before_kill: Counter[str] = Counter()
        for _ in range(600):
            before_kill = _stored_lines([victim])[victim.client_id]
            if len(before_kill) >= 20:
                break
            time.sleep(0.05)
        victim.kill()
        stored_total = sum(len(list(Store(home).iter_refs(n))) for n in names)
        print(f"SIGKILLed {victim.client_id} after it stored {len(before_kill)} segments "
              f"({stored_total} of {BOXES * SEGMENTS} stored in all)")
        assert 20 <= len(before_kill) and stored_total < BOXES * SEGMENTS, "kill was not mid-run"
        # Its supervisor restarts it (systemd: Restart=always). Meanwhile the broker keeps
        # assigning it a share of the messages (mosquitto queues them in its persistent
        # session); the boxes send what is not acked again, to whichever receiver gets it.
        time.sleep(2.0)
        victim.start()
        for thread in threads:
            thread.join(110)
        time.sleep(1.0)
        for receiver in receivers:
            receiver.stop()

        store = Store(home)
        per_receiver = _stored_lines(receivers)
        stored_by = Counter[str]()
        for counts in per_receiver.values():
            stored_by.update(counts)
        acked = sum(sum(1 for s in sealed[b.device] if b.acked(s)) for b in boxes)
        print("stored by receiver: " + ", ".join(
            f"{cid}: {sum(c.values())}" for cid, c in per_receiver.items()))
        print(f"acked {acked} of {BOXES * SEGMENTS}; acks received "
              f"{sum(b.ack_count for b in boxes)}")
        assert acked == BOXES * SEGMENTS
        for name in names:
            assert [r.seq for r in store.iter_refs(name)] == list(range(SEGMENTS))
            for seg in sealed[name]:
                assert store.load(name, seg.seq).manifest_sha256 == seg.manifest_sha256
        # Stored exactly once: no segment was stored twice (a redelivery is answered
        # "duplicate"), and nothing conflicting was quarantined. A segment the victim stored in
        # the instant before SIGKILL has no log line (it is in the store, and was acked
        # "duplicate" by another receiver when the box sent it again): at most one, as a
        # receiver handles one message at a time.
        assert set(stored_by.values()) == {1}
        unlogged = {f"rec/v1/{n}/seg/{s.seq}" for n in names for s in sealed[n]} - set(stored_by)
        print(f"stored in the kill window without a log line: {sorted(unlogged)}")
        assert len(unlogged) <= 1
        assert store.quarantine_entries() == []
        assert all(sum(c.values()) > 0 for c in per_receiver.values()), per_receiver
        with Index(home.index_path) as index:
            assert len(index.segments()) == BOXES * SEGMENTS
            assert index.check(store) == []
        audit = subprocess.run([sys.executable, "-m", "central", "--home", str(home.root),
                                "verify"], capture_output=True, text=True, check=False)
        print(audit.stdout.strip().splitlines()[-1])
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        for box in boxes:
            box.close()
        for receiver in receivers:
            receiver.stop()
        broker.stop()
