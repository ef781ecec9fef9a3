"""Storage checks on real files: a journal written by a real capture process (then damaged),
an outbox holding real sealed segments (then one damaged), and the write+fsync probe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyrage
import soundfile

from appliance.buffer.format import FILE_HEADER_SIZE, RECORD_HEADER_SIZE
from appliance.config import Config, load_config
from appliance.selftest import CheckResult, Verdict, run_selftest
from appliance.sync.outbox import Outbox
from linerec_contract.identity import DeviceKey
from tests.sync.helpers import add_wire_segment, seal_chain


def config(tmp_path: Path) -> Config:
    wav = tmp_path / "in.wav"
    rng = np.random.default_rng(3)
    soundfile.write(str(wav), rng.normal(0, 0.01, (8000 * 4, 2)), 8000, subtype="PCM_16")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[[capture]]\nsource = "wav"\nwav_path = "{wav}"\nrealtime = false\n'
                   f'[ring]\nsize_mb = 1\nslot_size = 4096\n')
    return load_config(cfg)


def one(cfg: Config, check: str) -> CheckResult:
    res = run_selftest(cfg, only=[check]).results
    assert len(res) == 1, res
    return res[0]


def test_journal_written_by_capture_passes_then_damage_fails(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert one(cfg, "journal").verdict is Verdict.SKIP
    p = subprocess.run([sys.executable, "-m", "appliance", "stage", "capture", "--config",
                        str(tmp_path / "cfg.toml")], capture_output=True, text=True, timeout=120,
                       check=False)
    assert p.returncode == 0, p.stderr
    r = one(cfg, "journal")
    assert r.verdict is Verdict.PASS and isinstance(r.value, int) and r.value > 10
    ring = cfg.ring_path("main")
    with ring.open("r+b") as f:  # flip one payload byte of slot 3: its CRC no longer checks
        f.seek(FILE_HEADER_SIZE + 3 * 4096 + RECORD_HEADER_SIZE + 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))
    r = one(cfg, "journal")
    assert r.verdict is Verdict.FAIL and "1 corrupt slot" in r.detail
    assert r.hint.startswith(f"journal {ring} has damage: run 'appliance buffer check {ring}'")


def test_outbox_with_real_segments_passes_then_a_damaged_one_fails(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert one(cfg, "outbox").verdict is Verdict.SKIP
    box = Outbox(cfg.outbox_dir)
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    for wire in seal_chain("box1", DeviceKey.generate(), [recipient], 3, seed=1):
        add_wire_segment(box, wire)
    r = one(cfg, "outbox")
    assert r.verdict is Verdict.PASS and r.value == 3
    seg = box.seg_path(1)
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # the encrypted payload, as a failing card would return it
    seg.write_bytes(bytes(data))
    r = one(cfg, "outbox")
    assert r.verdict is Verdict.FAIL and r.detail.startswith("1: payload SHA-256")
    assert "damaged segments in the outbox" in r.hint


def test_disk_checks_measure_the_state_folder(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert not cfg.state_dir.exists()
    r = one(cfg, "disk-latency")  # makes the state folder, as the first run of the box would
    assert r.verdict in (Verdict.PASS, Verdict.WARN, Verdict.FAIL)
    assert isinstance(r.value, float) and r.value > 0 and "over 20 writes" in r.detail
    assert list(cfg.state_dir.iterdir()) == []  # the probe file is gone
    r = one(cfg, "disk-space")
    assert isinstance(r.value, float) and r.value > 0


def test_unattended_run_skips_the_plug_step(tmp_path: Path) -> None:
    """A remote (fleet) run cannot ask for the test plug: loopback reports SKIP with a hint."""
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[selftest]\nplayback_device = "play"\n'
                        f'[paths]\nstate_dir = "{tmp_path}"\n')
    r = one(load_config(cfg_file), "loopback")
    assert r.verdict is Verdict.SKIP and "needs a technician with the test plug" in r.hint


def test_unattended_run_keeps_its_result(tmp_path: Path) -> None:
    from appliance.selftest import load_last_result, run_unattended

    cfg = config(tmp_path)
    result = run_unattended(cfg, only=["memory", "loopback"])
    assert load_last_result(cfg) == result
    assert [r.check for r in result.results] == ["loopback", "memory"]


def _sysfs_for(folder: Path, root: Path, dm_uuid: str | None) -> None:
    """A stand-in for /sys/dev/block/MAJ:MIN of the device holding ``folder``: a dm-crypt volume
    made by cryptsetup has dm/uuid 'CRYPT-LUKS2-<uuid>-<name>' (the kernel's device-mapper
    interface); a plain partition has no dm folder."""
    import os

    dev = os.stat(folder).st_dev
    node = root / f"{os.major(dev)}:{os.minor(dev)}"
    node.mkdir(parents=True)
    if dm_uuid is not None:
        (node / "dm").mkdir()
        (node / "dm" / "uuid").write_text(dm_uuid + "\n")


def test_data_encryption_names_how_the_partition_was_opened(tmp_path: Path, monkeypatch) -> None:
    # The sysfs tree and the data-unlock record are stand-ins here: a dm-crypt device cannot be
    # made on this machine (no device-mapper). The OS image test runs the check on a real one.
    from appliance.selftest import system

    cfg = config(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    plain, crypt = tmp_path / "sys-plain", tmp_path / "sys-crypt"
    _sysfs_for(cfg.state_dir, plain, None)
    _sysfs_for(cfg.state_dir, crypt, "CRYPT-LUKS2-3f1c2a7e8b9d4c0e9a1b2c3d4e5f6a7b-data")
    record = tmp_path / "unlock-record"
    monkeypatch.setattr(system, "DATA_UNLOCK_STATE", record)

    monkeypatch.setattr(system, "SYS_DEV_BLOCK", plain)
    res = one(cfg, "data-encryption")
    assert (res.verdict, res.value) == (Verdict.WARN, "none")
    assert "not on an encrypted volume" in res.hint

    monkeypatch.setattr(system, "SYS_DEV_BLOCK", crypt)
    expected = {"tpm": Verdict.PASS, "esp-key": Verdict.WARN, "recovery": Verdict.WARN}
    for unlock, verdict in expected.items():
        record.write_text(f"unlock={unlock}\ntpm={int(unlock == 'tpm')}\n")
        res = one(cfg, "data-encryption")
        assert (res.verdict, res.value) == (verdict, unlock), unlock
        assert res.detail == f"LUKS2, opened by {unlock}"
    record.write_text("unlock=esp-key\n")
    assert "no TPM" in one(cfg, "data-encryption").hint
    # The record data-unlock writes when the firmware declares a TPM no driver bound.
    record.write_text("unlock=esp-key\ntpm=unbound\ntpm_declared=ACPI TPM2 table\n")
    res = one(cfg, "data-encryption")
    assert (res.verdict, res.value) == (Verdict.WARN, "esp-key")
    assert "declares a TPM (ACPI TPM2 table)" in res.hint and "no driver" in res.hint
    record.unlink()
    res = one(cfg, "data-encryption")
    assert (res.verdict, res.detail) == (Verdict.PASS, "LUKS2 (no record of how it was opened)")


def test_data_encryption_on_this_machine_matches_sysfs(tmp_path: Path) -> None:
    import os

    cfg = config(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    dev = os.stat(cfg.state_dir).st_dev
    uuid = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/dm/uuid")
    encrypted = uuid.exists() and uuid.read_text().startswith("CRYPT-LUKS")
    res = one(cfg, "data-encryption")
    assert (res.value == "none") is not encrypted
    if not encrypted:
        assert res.verdict is Verdict.WARN
