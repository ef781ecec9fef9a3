"""The recorder's files on disk: call metadata is readable by the box's user only, folders and
spools are created with their parent folder synced, and under PCI masking the checkpoint never
holds a digit. The phone lines are simulated (appliance.audio.simulator)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audio.simulator import LineSimulator
from appliance.recorder.service import Recorder
from linerec_contract import durable
from linerec_contract.identity import DeviceKey, generate_age_identity
from tests.recorder.recorder_support import DEFAULT_RECORDER, RATE, recorder_config, write_ring


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, so that a 0644 file would show up as such."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every folder fsynced through linerec_contract.durable, in order."""
    calls: list[Path] = []
    real = durable.fsync_dir

    def spy(path: Path) -> None:
        calls.append(Path(path))
        real(path)

    monkeypatch.setattr(durable, "fsync_dir", spy)
    monkeypatch.setattr("appliance.recorder.spool.fsync_dir", spy)
    return calls


def test_ensure_dir_creates_each_level_with_its_parent_synced(tmp_path: Path,
                                                              synced: list[Path]) -> None:
    target = tmp_path / "a" / "b" / "c"
    durable.ensure_dir(target, 0o700)
    assert target.is_dir()
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    synced.clear()
    durable.ensure_dir(target)
    assert synced == []  # nothing created, nothing synced
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        durable.ensure_dir(tmp_path / "file" / "sub")


def test_call_metadata_files_are_0600_and_folders_durable(tmp_path: Path, umask_022: None,
                                                           synced: list[Path]) -> None:
    _, recipient = generate_age_identity()
    cfg = recorder_config(tmp_path / "box", recipient,
                          recorder=f"{DEFAULT_RECORDER}\npci_masking = true")
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=11, mean_idle_s=8.0, mean_call_s=20.0, max_call_s=40.0)
    write_ring(cfg, sim.render, 2, 70.0)
    rec_dir = cfg.state_dir / "recorder"
    assert not rec_dir.exists()
    synced.clear()

    rec = Recorder(cfg, recipients=[recipient], key=key)
    # recorder/ and recorder/spool/ were created, each with its parent synced.
    assert synced[:2] == [cfg.state_dir, rec_dir], synced
    assert mode(rec_dir / "spool") == 0o700
    spools_seen: set[str] = set()
    calls_seen = 0
    while rec.step():
        rec.checkpoint()
        text = (rec_dir / "state.json").read_text()
        state = json.loads(text)
        dialled = [ln["call"]["dialled"] for ln in state["streams"]["main"]["lines"]
                   if ln["call"] is not None and ln["call"]["dialled"]]
        assert not dialled and '"digit"' not in text, "a digit reached the checkpoint"
        calls_seen += sum(1 for ln in state["streams"]["main"]["lines"] if ln["call"])
        for spool in (rec_dir / "spool").glob("*.pcm"):
            assert mode(spool) == 0o600, spool
            spools_seen.add(spool.name)
        assert mode(rec_dir / "state.json") == 0o600
    assert len(spools_seen) >= 2
    # Every spool file was created with its folder synced (the checkpoint names it).
    assert sum(1 for p in synced if p == rec_dir / "spool") >= len(spools_seen)
    assert calls_seen >= 4  # checkpoints with open calls were inspected
    segs = sorted(cfg.outbox_dir.glob("seg-*.seg"))
    assert segs and all(mode(p) == 0o600 for p in segs)
    # A checkpoint left world-readable by an older version is tightened at the next write.
    os.chmod(rec_dir / "state.json", 0o644)
    Recorder(cfg, recipients=[recipient], key=key).checkpoint()
    assert mode(rec_dir / "state.json") == 0o600
