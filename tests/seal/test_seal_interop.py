"""Interop with the stock tools central IT uses: age, flac, sox, opusinfo, zstd (real binaries)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from linerec_contract.identity import DeviceKey, generate_age_identity, write_age_identity
from linerec_contract.segment import seal_segment

from .helpers import make_input, speechish

TOOLS = ("age", "flac", "sox", "opusinfo", "zstd")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason=f"needs the tools {', '.join(TOOLS)}"
)


def _age_decrypt(tmp_path: Path, payload: bytes, secret: str, name: str) -> Path:
    ident = tmp_path / f"{name}.key"
    write_age_identity(ident, secret)
    src, out = tmp_path / f"{name}.age", tmp_path / f"{name}.out"
    src.write_bytes(payload)
    subprocess.run(["age", "-d", "-i", str(ident), "-o", str(out), str(src)], check=True,
                   capture_output=True)
    return out


def test_flac_payload_opens_with_age_flac_and_sox(tmp_path: Path, device_key: DeviceKey) -> None:
    pcm = speechish(1.5)
    secret, recipient = generate_age_identity()
    seg = seal_segment(make_input(pcm), device_id="box-1", seq=0, prev_manifest_sha256=None,
                       recipients=[recipient], key=device_key, codec="flac")
    audio = _age_decrypt(tmp_path, seg.payload, secret, "flac")
    flac_file = audio.rename(tmp_path / "seg.flac")
    subprocess.run(["flac", "-t", "-s", str(flac_file)], check=True, capture_output=True)
    raw = subprocess.run(
        ["sox", str(flac_file), "-t", "raw", "-e", "signed-integer", "-b", "16", "-L", "-"],
        check=True, capture_output=True).stdout
    np.testing.assert_array_equal(np.frombuffer(raw, "<i2"), pcm)
    rate = subprocess.run(["sox", "--i", "-r", str(flac_file)], check=True,
                          capture_output=True).stdout
    assert rate.strip() == b"8000"


def test_opus_payload_accepted_by_opusinfo(tmp_path: Path, device_key: DeviceKey) -> None:
    secret, recipient = generate_age_identity()
    seg = seal_segment(make_input(speechish(2.0)), device_id="box-1", seq=0,
                       prev_manifest_sha256=None, recipients=[recipient], key=device_key,
                       codec="opus", opus_bitrate=12000)
    out = _age_decrypt(tmp_path, seg.payload, secret, "opus").rename(tmp_path / "seg.opus")
    info = subprocess.run(["opusinfo", str(out)], capture_output=True, check=True).stdout.decode()
    assert "Opus" in info and "Playback length: 0m:02" in info


def test_zstd_pcm_payload_gives_exact_pcm(tmp_path: Path, device_key: DeviceKey) -> None:
    pcm = speechish(1.0)
    secret, recipient = generate_age_identity()
    seg = seal_segment(make_input(pcm), device_id="box-1", seq=0, prev_manifest_sha256=None,
                       recipients=[recipient], key=device_key, codec="zstd-pcm")
    out = _age_decrypt(tmp_path, seg.payload, secret, "zstd").rename(tmp_path / "seg.zst")
    raw = subprocess.run(["zstd", "-d", "-c", str(out)], check=True, capture_output=True).stdout
    assert raw == pcm.astype("<i2").tobytes()


def test_two_recipients_each_decrypt(tmp_path: Path, device_key: DeviceKey) -> None:
    pcm = speechish(0.5)
    pairs = [generate_age_identity() for _ in range(2)]
    seg = seal_segment(make_input(pcm), device_id="box-1", seq=0, prev_manifest_sha256=None,
                       recipients=[r for _, r in pairs], key=device_key, codec="flac")
    outputs = [_age_decrypt(tmp_path, seg.payload, s, f"r{i}").read_bytes()
               for i, (s, _) in enumerate(pairs)]
    assert outputs[0] == outputs[1] and outputs[0].startswith(b"fLaC")
    stranger, _ = generate_age_identity()
    with pytest.raises(subprocess.CalledProcessError):
        _age_decrypt(tmp_path, seg.payload, stranger, "stranger")


def test_age_keygen_identity_is_a_valid_recipient(tmp_path: Path, device_key: DeviceKey) -> None:
    ident = tmp_path / "central.key"
    subprocess.run(["age-keygen", "-o", str(ident)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(ident)], check=True,
                               capture_output=True).stdout.decode().strip()
    seg = seal_segment(make_input(), device_id="box-1", seq=0, prev_manifest_sha256=None,
                       recipients=[recipient], key=device_key, codec="flac")
    src = tmp_path / "p.age"
    src.write_bytes(seg.payload)
    out = subprocess.run(["age", "-d", "-i", str(ident), str(src)], check=True,
                         capture_output=True).stdout
    assert out.startswith(b"fLaC")
