"""``appliance verify``: constant memory, only regular files, central's stored segments, and a
chain that starts after what a live box already had acknowledged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from central.home import init_home
from central.store import Store
from linerec_contract.canonical import canonical_json
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import (
    WIRE_HEADER,
    WIRE_MAGIC,
    WIRE_VERSION,
    SealedSegment,
    encode_wire,
    seal_segment,
)
from tests.box.support import appliance
from tests.seal.helpers import make_input

GIB = 1 << 30
RSS_LIMIT_MIB = 100


def chain(key: DeviceKey, n: int) -> list[SealedSegment]:
    _, recipient = generate_age_identity()
    prev = None
    out = []
    for seq in range(n):
        seg = seal_segment(make_input(part=seq, last_part=seq == n - 1), device_id="box-0001",
                           seq=seq, prev_manifest_sha256=prev, recipients=[recipient], key=key)
        prev = seg.manifest_sha256
        out.append(seg)
    return out


def zeros_sha256(size: int) -> str:
    h = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(size // len(block)):
        h.update(block)
    return h.hexdigest()


def test_one_gib_segment_is_verified_in_constant_memory(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    seg = chain(key, 1)[0]
    # The same manifest, re-signed for a 1 GiB payload of zeros (a sparse file: fast to make).
    manifest = dict(seg.manifest, payload_bytes=GIB, payload_sha256=zeros_sha256(GIB))
    big = SealedSegment(manifest=manifest, signature=key.sign(canonical_json(manifest)),
                        payload=b"")
    signed = big.signed_manifest_json()
    path = tmp_path / "seg-000000000000.seg"
    with path.open("wb") as f:
        f.write(WIRE_HEADER.pack(WIRE_MAGIC, WIRE_VERSION, 0, 0, len(signed), GIB))
        f.write(signed)
        f.truncate(WIRE_HEADER.size + len(signed) + GIB)
    # A fresh process measures its only child, so no earlier child's peak counts.
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'appliance', 'verify', *sys.argv[1:]],"
        " capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(r.stdout + r.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path), "--pubkey", key.public_b64],
                         capture_output=True, text=True, timeout=300, check=False)
    code, maxrss_kib = map(int, out.stdout.split())
    assert code == 0, out.stderr
    assert "all segments verified" in out.stderr
    assert maxrss_kib / 1024 < RSS_LIMIT_MIB, f"peak RSS {maxrss_kib / 1024:.0f} MiB"


def test_a_changed_byte_deep_in_a_large_payload_is_found(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    seg = chain(key, 1)[0]
    path = tmp_path / "seg.seg"
    data = bytearray(encode_wire(seg))
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    result = appliance("verify", str(path), "--pubkey", key.public_b64)
    assert result.returncode == 1 and "SHA-256" in result.stdout, result.stdout


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_non_regular_files_are_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)  # nobody writes: reading it would hang
    elif kind == "folder":
        target = tmp_path / "folder"
        target.mkdir()
    else:
        target = Path("/dev/zero")  # reading it would never end
    key = DeviceKey.generate()
    result = appliance("verify", str(target), "--pubkey", key.public_b64, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "not a segment file" in lines[0]
    assert "Traceback" not in result.stderr


def test_segments_as_central_stores_them_are_accepted(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    segs = chain(key, 3)
    home = init_home(tmp_path / "central")
    store = Store(home)
    for seg in segs:
        store.put(seg)
    manifests = sorted((home.store_dir / "box-0001").glob("*.manifest.json"))
    payloads = sorted((home.store_dir / "box-0001").glob("*.age"))
    assert len(manifests) == len(payloads) == 3
    result = appliance("verify", *map(str, manifests), "--pubkey", key.public_b64, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [s["seq"] for s in json.loads(result.stdout)["segments"]] == [0, 1, 2]
    # Naming the payloads (or both halves) means the same segments.
    result = appliance("verify", *map(str, payloads + manifests), "--pubkey", key.public_b64,
                       "--json")
    assert result.returncode == 0, result.stdout
    assert len(json.loads(result.stdout)["segments"]) == 3
    # A changed payload byte at central is found too.
    data = bytearray(payloads[1].read_bytes())
    data[20] ^= 0x01
    payloads[1].write_bytes(bytes(data))
    result = appliance("verify", *map(str, manifests), "--pubkey", key.public_b64)
    assert result.returncode == 1 and "SHA-256" in result.stdout


def test_live_box_chain_starts_after_the_last_acknowledged_segment(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    state = tmp_path / "state"
    (state / "keys").mkdir(parents=True)
    key.save(state / "keys" / "device.key")
    outbox = state / "outbox"
    outbox.mkdir()
    segs = chain(key, 5)
    for seg in segs[3:]:  # 0..2 were acknowledged by central and deleted
        (outbox / f"seg-{seg.seq:012d}.seg").write_bytes(encode_wire(seg))
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{state}"\n')
    files = sorted(map(str, outbox.glob("seg-*.seg")))
    # Without the outbox's record of acks, 0..2 are a gap.
    result = appliance("verify", *files, "--config", str(cfg))
    assert result.returncode == 1 and "CHAIN gap at seq 0" in result.stdout, result.stdout
    (outbox / "acked.json").write_text(json.dumps({"highest_acked": 2}))
    result = appliance("verify", *files, "--config", str(cfg))
    assert result.returncode == 0, result.stdout
    assert "from seq 3" in result.stdout and "all segments verified" in result.stdout
    # A segment missing after the acknowledged ones is still a gap.
    os.unlink(files[0])
    result = appliance("verify", files[1], "--config", str(cfg))
    assert result.returncode == 1 and "CHAIN gap at seq 3" in result.stdout, result.stdout
