"""A large segment (about 64 MiB) through the real intakes, its payload never whole in memory.

MQTT: real mosquitto (shipped config and ACL), a real receiver process, the segment in chunks of
the largest size accepted (``MAX_CHUNK_BYTES``, 1 MiB). HTTPS: ``serve-https`` (nginx + uvicorn)
with the body spooled to disk. The receiver's peak resident memory (VmHWM from /proc) after the
large segment is compared with its peak after a small segment in the same run.

The bound: 16 chunks (16 MiB) over that reference. The receiver holds one MQTT message at a
time (paho's read buffer plus one copy), and copies, hashes and stores a payload in blocks of
``COPY_BLOCK`` (1 MiB); a few MiB of allocator slack come on top. A payload held whole would
add at least its own 64 MiB, so the bound tells the two apart with room on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.sync.broker import Broker
from central.home import Home, init_home
from central.store import Store
from linerec_contract.identity import DeviceKey
from linerec_contract.pki import ensure_pki
from linerec_contract.protocol import MAX_CHUNK_BYTES, Ack
from linerec_contract.segment import SealedSegment, encode_wire
from linerec_contract.verify import verify_trusted

from .central_helpers import DEVICE, Box
from .mqtt_support import LightBox, ReceiverProcess
from .test_central_https import Intake, intake, pki, vm_kib  # noqa: F401 - fixtures

MIB = 1024 * 1024
BOUND = 16 * MAX_CHUNK_BYTES
LARGE_FRAMES = 34_000_000  # int16 noise, zstd-pcm: about 65 MiB of payload


def _noise(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-20000, 20000, frames, dtype=np.int16)


def _small_large_small(box: Box) -> tuple[SealedSegment, SealedSegment, SealedSegment]:
    """Seq 0 small (the reference), seq 1 large, seq 2 small: its chain check reads the large
    segment's stored manifest, which must not pull in its payload."""
    small = box.seal_call("warm-up", _noise(2_000_000, 1), 1, codec="zstd-pcm")[0]
    large = box.seal_call("large", _noise(LARGE_FRAMES, 2), 1, codec="zstd-pcm")[0]
    after = box.seal_call("after", _noise(800_000, 3), 1, codec="zstd-pcm")[0]
    assert len(large.payload) > 64 * MIB
    return small, large, after


def _stored_and_verifies(home: Home, seg: SealedSegment) -> None:
    got = Store(home).load(seg.device_id, seg.seq)
    assert got.payload_sha256 == seg.payload_sha256 and got.manifest == seg.manifest
    device = home.device(seg.device_id)
    assert device is not None
    verify_trusted(got, device.trust())


def test_a_large_chunked_segment_over_mqtt_stays_within_a_few_chunks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki_ = ensure_pki(tmp_path / "pki", ["central", DEVICE])
    home = init_home(tmp_path / "central")
    key = DeviceKey.generate()
    home.enroll(DEVICE, key.public_b64)
    small, large, after = _small_large_small(Box(DEVICE, key, home.recipients()))
    broker = Broker(tmp_path / "broker", pki_)
    broker.start()
    receiver = ReceiverProcess(home.root, broker, "central", tmp_path)
    box = None
    try:
        receiver.start()
        box = LightBox(broker, DEVICE, chunk_bytes=MAX_CHUNK_BYTES)
        box.send_all([small], ack_timeout_s=300, give_up_s=300)
        assert box.acked(small)
        reference = receiver.vm_hwm_kib() << 10
        box.send_all([large, after], ack_timeout_s=300, give_up_s=300)
        assert [box.acks[s.seq].result for s in (large, after)] == ["stored", "stored"]
        peak = receiver.vm_hwm_kib() << 10
    finally:
        if box is not None:
            box.close()
        receiver.stop()
        broker.stop()
    with capsys.disabled():
        print(f"\nMQTT, {len(encode_wire(large)) / MIB:.1f} MiB segment in "
              f"{MAX_CHUNK_BYTES // 1024} KiB chunks: receiver VmHWM {reference / MIB:.1f} MiB "
              f"after a small segment, {peak / MIB:.1f} MiB after the large one "
              f"(bound +{BOUND // MIB} MiB)")
    assert peak - reference < BOUND, (reference, peak)
    _stored_and_verifies(home, large)


def test_a_large_segment_over_https_is_verified_from_its_spool_file(
        intake: Intake, box: Box, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    small, large, after = _small_large_small(box)
    status, body = intake.put(DEVICE, f"/v1/{DEVICE}/seg/{small.seq}", encode_wire(small))
    assert status == 200 and Ack.decode(body).result == "stored"
    reference = vm_kib(intake.proc.pid, "VmHWM") << 10
    blob = encode_wire(large)
    status, body = intake.put(DEVICE, f"/v1/{DEVICE}/seg/{large.seq}", blob, timeout=300)
    del blob
    assert status == 200 and Ack.decode(body).result == "stored", body
    status, body = intake.put(DEVICE, f"/v1/{DEVICE}/seg/{after.seq}", encode_wire(after))
    assert status == 200 and Ack.decode(body).result == "stored", body
    peak = vm_kib(intake.proc.pid, "VmHWM") << 10
    with capsys.disabled():
        print(f"\nHTTPS, {len(large.payload) / MIB:.1f} MiB payload: serve-https VmHWM "
              f"{reference / MIB:.1f} MiB after a small segment, {peak / MIB:.1f} MiB after "
              f"the large one (bound +{BOUND // MIB} MiB)")
    assert peak - reference < BOUND, (reference, peak)
    _stored_and_verifies(intake.home, large)
