"""`appliance verify SEGMENT...`: the box-side check of signatures, hashes and the chain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import encode_wire, seal_segment
from tests.seal.helpers import make_input


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def write_chain(folder: Path, key: DeviceKey, n: int) -> list[Path]:
    _, recipient = generate_age_identity()
    prev = None
    paths = []
    for seq in range(n):
        seg = seal_segment(make_input(part=seq, last_part=seq == n - 1), device_id="box-0001",
                           seq=seq, prev_manifest_sha256=prev, recipients=[recipient], key=key)
        prev = seg.manifest_sha256
        path = folder / f"seg-{seq:012d}.seg"
        path.write_bytes(encode_wire(seg))
        paths.append(path)
    return paths


def test_verify_good_chain(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    paths = write_chain(tmp_path, key, 4)
    result = appliance("verify", *map(str, paths), "--pubkey", key.public_b64, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and [s["seq"] for s in report["segments"]] == [0, 1, 2, 3]


def test_verify_names_tampering_gap_and_foreign_key(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    paths = write_chain(tmp_path, key, 4)
    data = bytearray(paths[1].read_bytes())
    data[-10] ^= 0x01  # a byte of the encrypted payload
    paths[1].write_bytes(bytes(data))
    result = appliance("verify", str(paths[0]), str(paths[1]), str(paths[3]),
                       "--pubkey", key.public_b64)
    assert result.returncode == 1
    assert "FAIL" in result.stdout and paths[1].name in result.stdout
    assert "CHAIN gap" in result.stdout  # seq 2 is missing (and 1 failed)
    foreign = tmp_path / "other-box"
    foreign.mkdir()
    other_paths = write_chain(foreign, DeviceKey.generate(), 1)
    result = appliance("verify", *map(str, other_paths), "--pubkey", key.public_b64)
    assert result.returncode == 1 and "not by the key given" in result.stdout


def test_verify_unreadable_file_is_reported(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    junk = tmp_path / "junk.seg"
    junk.write_bytes(b"not a segment")
    result = appliance("verify", str(junk), str(tmp_path / "missing.seg"), "--pubkey",
                       key.public_b64)
    assert result.returncode == 1
    assert "junk.seg" in result.stdout and "missing.seg" in result.stdout
