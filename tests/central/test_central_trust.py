"""One trust policy: which key may sign segment N of device D, at intake and in the audit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from central.cli import main
from central.home import Home
from central.receiver import SegmentIntake
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import SealedSegment, encode_wire
from linerec_contract.trust import DeviceTrust, Rotation, UntrustedKey

from .central_helpers import DEVICE, Box, known_signal


def _plant(home: Home, seg: SealedSegment) -> None:
    """Put a segment in the store behind intake's back (as a restored backup or an intruder
    with file access could): only the audit stands between it and an export."""
    Store(home).put(seg)


def _verify_json(home: Home, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["--home", str(home.root), "verify", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_audit_rejects_a_segment_of_device_a_signed_with_device_bs_key(
        home: Home, box: Box, make_box, capsys) -> None:
    other = make_box("box-2")  # enrolled too: its key is trusted, but only for box-2
    other.seal_call("b", known_signal(800), 2)
    for seg in other.sealed:
        _plant(home, seg)
    good = box.seal_call("c1", known_signal(800), 1)
    forged = box.seal_call("c2", known_signal(800, seed=2), 1, key=other.key)
    for seg in good + forged:
        _plant(home, seg)
    code, result = _verify_json(home, capsys)
    assert code == 1 and not result["ok"]
    issues = {(i["device"], i["kind"], i["seq"]) for i in result["issues"]}
    assert issues == {(DEVICE, "bad-signature", 1)}  # box-2's own chain is clean
    detail = next(i["detail"] for i in result["issues"] if i["kind"] == "bad-signature")
    assert f"{other.key.key_id} is not a trusted key of device {DEVICE}" in detail
    # Intake refuses the same segment outright.
    outcome = SegmentIntake(home).handle(segment_topic(DEVICE, 2),
                                         encode_wire(box.seal_call("c3", known_signal(80), 1,
                                                                   key=other.key)[0]))
    assert outcome.ack is not None and outcome.ack.result == "rejected"
    assert "not a trusted key of device box-1" in outcome.ack.reason


def test_rotation_at_intake_and_in_the_audit(home: Home, box: Box, capsys) -> None:
    old, new = box.key, DeviceKey.generate()
    intake = SegmentIntake(home)
    segs = box.seal_call("c1", known_signal(1500), 3, next_key=new)  # seq 2 announces `new`
    segs += box.seal_call("c2", known_signal(1000), 2, key=new)  # seq 3, 4 signed by `new`
    for seg in segs:
        outcome = intake.handle(segment_topic(DEVICE, seg.seq), encode_wire(seg))
        assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
    trust = home.device(DEVICE).trust()  # type: ignore[union-attr]
    assert trust.rotations == (Rotation(2, new.key_id, new.public_b64, old.key_id),)
    # The rotated-out key is refused after the rotation, although an operator enrolled it.
    late = box.seal_call("c3", known_signal(800), 1, key=old)[0]  # seq 5 by the old key
    outcome = intake.handle(segment_topic(DEVICE, 5), encode_wire(late))
    assert outcome.ack is not None and outcome.ack.result == "rejected"
    assert f"key {old.key_id} of {DEVICE} was retired by the rotation announced at seq 2" in \
        outcome.ack.reason
    assert not Store(home).exists(DEVICE, 5)
    code, result = _verify_json(home, capsys)
    assert code == 0, result["issues"]
    # The audit refuses it as well when it reaches the store some other way.
    _plant(home, late)
    code, result = _verify_json(home, capsys)
    assert code == 1
    assert [(i["kind"], i["seq"]) for i in result["issues"]] == [("bad-signature", 5)]
    assert "retired" in result["issues"][0]["detail"]


def test_policy_table() -> None:
    """The policy on its own, against the rules of docs/segment-format.md ("Key rotation")."""
    k1, k2, k3, stranger = (DeviceKey.generate() for _ in range(4))
    trust = DeviceTrust.of_keys("d", [k1.public_b64])
    trust = trust.with_rotation(Rotation(10, k2.key_id, k2.public_b64, k1.key_id))
    trust = trust.with_rotation(Rotation(20, k3.key_id, k3.public_b64, k2.key_id))
    expected = {  # (key, seq): may sign
        (k1, 0): True, (k1, 10): True, (k1, 11): False, (k1, 500): False,
        (k2, 10): False, (k2, 11): True, (k2, 20): True, (k2, 21): False,
        (k3, 20): False, (k3, 21): True, (stranger, 5): False,
    }
    for (key, seq), allowed in expected.items():
        assert trust.may_sign(key.key_id, seq) is allowed, (key.key_id, seq)
    with pytest.raises(UntrustedKey, match="was announced at seq 20"):
        trust.public_key(k3.key_id, 3)


def test_chain_check_and_store_wait_for_the_device_lock_of_another_process(
        home: Home, box: Box, tmp_path: Path) -> None:
    seg = box.seal_call("c1", known_signal(800), 1)[0]
    blob = tmp_path / "seg.bin"
    blob.write_bytes(encode_wire(seg))
    script = (
        "import sys; from pathlib import Path\n"
        "from central.home import open_home\nfrom central.receiver import SegmentIntake\n"
        f"out = SegmentIntake(open_home(Path({str(home.root)!r}))).handle("
        f"{segment_topic(DEVICE, 0)!r}, Path({str(blob)!r}).read_bytes())\n"
        "print(out.ack.result)\n"
    )
    store = Store(home)
    with store.device_lock(DEVICE):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True)
        # The other process is held at the lock: nothing of box-1 is written meanwhile.
        for _ in range(20):
            time.sleep(0.1)
            assert proc.poll() is None
            assert not store.exists(DEVICE, 0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "stored"
    assert store.exists(DEVICE, 0)
