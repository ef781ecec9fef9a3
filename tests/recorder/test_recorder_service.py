"""The recorder+sealer on a real ring journal: calls become sealed, chained, sample-exact parts,
and a recorder killed at any checkpoint resumes without losing or duplicating a segment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.audio.simulator import LineSimulator
from appliance.config import Config, parse_config
from appliance.recorder.service import Recorder
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import SealedSegment
from linerec_contract.trust import DeviceTrust
from linerec_contract.verify import audit_chain, open_segment_audio
from tests.recorder.recorder_support import (
    RATE,
    config_text,
    drain,
    outbox_segments,
    recorder_config,
    write_ring,
)


def make_config(state: Path, recipient: str, max_segment_s: float = 20.0) -> Config:
    return recorder_config(state, recipient,
                           recorder=f"max_segment_s = {max_segment_s}\ncommit_interval_s = 0.2")


def check_segments(segs: list[SealedSegment], key: DeviceKey, identity: str,
                   sim: LineSimulator, total: int) -> int:
    assert [s.seq for s in segs] == list(range(len(segs)))
    assert audit_chain(segs, {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64])
                               for s in segs}) == []
    calls: dict[str, list[SealedSegment]] = {}
    for s in segs:
        calls.setdefault(s.manifest["call_id"], []).append(s)
    for parts in calls.values():
        parts.sort(key=lambda s: s.manifest["part"])
        assert [p.manifest["part"] for p in parts] == list(range(len(parts)))
        end = parts[-1].manifest["start_frame"] + parts[-1].manifest["frames"]
        # Only a call still open when the journal ends may lack its last part (its open part
        # holds up to max_segment + stop delay + 1 s that are not sealed yet).
        assert parts[-1].manifest["last_part"] or end + 30 * RATE > total
        for a, b in zip(parts, parts[1:], strict=False):
            assert b.manifest["start_frame"] == a.manifest["start_frame"] + a.manifest["frames"]
        line = int(parts[0].manifest["line"][1:]) - 1
        for p in parts:
            audio, rate = open_segment_audio(p, identity)
            assert rate == RATE
            expected = sim.render(p.manifest["start_frame"], p.manifest["frames"])[:, line]
            assert np.array_equal(audio, expected)
    return len(calls)


def test_calls_become_chained_sample_exact_parts(tmp_path: Path) -> None:
    identity, recipient = generate_age_identity()
    cfg = make_config(tmp_path, recipient)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=11, mean_idle_s=8.0, mean_call_s=25.0, max_call_s=50.0)
    total = write_ring(cfg, sim.render, sim.lines, 180.0)
    recorder = Recorder(cfg, recipients=[recipient], key=key)
    drain(recorder)
    segs = outbox_segments(cfg)
    ncalls = check_segments(segs, key, identity, sim, total)
    truth = [c for c in sim.calls_between(0, total) if c.end_frame + 6 * RATE < total]
    assert ncalls >= len(truth) > 0
    assert any(s.manifest["part"] > 0 for s in segs), "no call was long enough to be cut"


@pytest.mark.parametrize("kill_after_steps", [1, 3, 7, 15, 40])
def test_restart_from_checkpoint_gives_the_same_segments(tmp_path: Path,
                                                          kill_after_steps: int) -> None:
    """Abandon a recorder mid-run (its in-memory state is lost, as in a crash) and start a new one
    on the same state folder: the outbox ends up gapless, chained and sample-exact."""
    identity, recipient = generate_age_identity()
    cfg = make_config(tmp_path, recipient)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=5, mean_idle_s=7.0, mean_call_s=25.0, max_call_s=50.0)
    total = write_ring(cfg, sim.render, sim.lines, 150.0)
    first = Recorder(cfg, recipients=[recipient], key=key)
    # Small polls so the crash lands between seals; the state on disk is whatever was committed.
    for _ in range(kill_after_steps):
        first.step()
    del first
    second = Recorder(cfg, recipients=[recipient], key=key)
    drain(second)
    check_segments(outbox_segments(cfg), key, identity, sim, total)


RECORDER_CHILD = """
import sys, threading
from pathlib import Path
from appliance.config import load_config
from appliance.recorder.service import Recorder
from tests.recorder.recorder_support import (
    RATE,
    config_text,
    drain,
    outbox_segments,
    recorder_config,
    write_ring,
)
from linerec_contract.identity import DeviceKey
cfg = load_config(Path(sys.argv[1]))
rec = Recorder(cfg, recipients=list(cfg.seal.recipients),
               key=DeviceKey.load(cfg.keys_dir / "device.key"))
rec.run(threading.Event(), status_path=None)
"""


def test_sigkill_real_recorder_process(tmp_path: Path) -> None:
    """SIGKILL a real recorder process repeatedly while it seals; the final outbox is exact."""
    identity, recipient = generate_age_identity()
    text = config_text(tmp_path, recipient, recorder="max_segment_s = 10.0\ncommit_interval_s = 0.2")
    cfg = parse_config(text)
    cfg_path = tmp_path / "appliance.toml"
    cfg_path.write_text(text)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(3, RATE, seed=9, mean_idle_s=7.0, mean_call_s=25.0, max_call_s=50.0)
    total = write_ring(cfg, sim.render, sim.lines, 240.0)
    rng = np.random.default_rng(1)
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", RECORDER_CHILD, str(cfg_path)])
        time.sleep(float(rng.uniform(0.3, 1.5)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    recorder = Recorder(cfg, recipients=[recipient], key=key)
    drain(recorder)
    ncalls = check_segments(outbox_segments(cfg), key, identity, sim, total)
    assert not list(cfg.outbox_dir.glob(".*.prep"))
    print(f"recorder SIGKILLed {kills} times: {len(outbox_segments(cfg))} segments, {ncalls} calls")
    _ = threading


def test_key_rotation_is_announced_in_the_chain(tmp_path: Path) -> None:
    """`appliance keys rotate` leaves a next key; the next segment announces it, signed by the
    old key, and later segments are signed by the new one: the chain verifies with the old key."""
    from appliance.recorder.service import NEXT_KEY_FILE

    identity, recipient = generate_age_identity()
    cfg = make_config(tmp_path, recipient)
    old = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=11, mean_idle_s=8.0, mean_call_s=25.0, max_call_s=50.0)
    total = write_ring(cfg, sim.render, sim.lines, 180.0)
    recorder = Recorder(cfg, recipients=[recipient], key=old)
    while recorder.sealed < 2:
        assert recorder.step(), "journal ended before two segments were sealed"
    new = DeviceKey.generate()
    new.save(cfg.keys_dir / NEXT_KEY_FILE)
    drain(recorder)
    segs = outbox_segments(cfg)
    announced = [s for s in segs if "next_signing_key" in s.manifest]
    assert len(announced) == 1
    assert announced[0].manifest["signing_key_id"] == old.key_id
    assert announced[0].manifest["next_signing_key"]["key_id"] == new.key_id
    later = [s for s in segs if s.seq > announced[0].seq]
    assert later and all(s.manifest["signing_key_id"] == new.key_id for s in later)
    assert DeviceKey.load(cfg.keys_dir / "device.key").key_id == new.key_id
    assert not (cfg.keys_dir / NEXT_KEY_FILE).exists()
    # Central only knows the old key: the announcement carries the chain over to the new one.
    check_segments(segs, old, identity, sim, total)


def quota_config(state: Path, recipient: str, policy: str, quota_mb: float) -> Config:
    return recorder_config(state, recipient, recorder="max_segment_s = 10.0",
                           uplink=f'outbox_max_mb = {quota_mb}\ndisk_full_policy = "{policy}"')


def test_drop_oldest_losses_are_announced_in_the_chain(tmp_path: Path) -> None:
    """A full outbox under drop-oldest deletes unsent segments, and a later manifest says so:
    the audit sees each gap with the box's reason, never an unexplained hole."""
    identity, recipient = generate_age_identity()
    cfg = quota_config(tmp_path, recipient, "drop-oldest", 0.25)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=11, mean_idle_s=7.0, mean_call_s=25.0, max_call_s=50.0)
    write_ring(cfg, sim.render, sim.lines, 240.0)
    recorder = Recorder(cfg, recipients=[recipient], key=key)
    drain(recorder)
    segs = outbox_segments(cfg)
    kept = {s.seq for s in segs}
    assert kept and max(kept) + 1 > len(kept), "nothing was dropped: lower the quota"
    issues = audit_chain(segs, {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64])
                               for s in segs})
    gaps = [i for i in issues if i.kind == "gap"]
    assert gaps and all("announced by the box" in i.detail for i in gaps[:-1]), issues
    # The newest drops may not be announced yet (no later segment sealed): they are still
    # pending in the outbox's durable loss list, so the next segment will carry them.
    unannounced = [i for i in gaps if "announced by the box" not in i.detail]
    pending = {s for loss in recorder.outbox.pending_losses()
               for s in range(loss["lost_seq"][0], loss["lost_seq"][1] + 1)}
    assert {i.seq for i in unannounced} <= pending
    assert all(i.kind in ("gap", "bad-link") for i in issues), issues


def test_stop_new_calls_records_no_new_call_and_says_so(tmp_path: Path) -> None:
    identity, recipient = generate_age_identity()
    cfg = quota_config(tmp_path, recipient, "stop-new-calls", 0.25)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=11, mean_idle_s=7.0, mean_call_s=25.0, max_call_s=50.0)
    write_ring(cfg, sim.render, sim.lines, 240.0)
    recorder = Recorder(cfg, recipients=[recipient], key=key)
    drain(recorder)
    segs = outbox_segments(cfg)
    assert [s.seq for s in segs] == list(range(len(segs))), "stop-new-calls never deletes"
    refused = [a for a in recorder.alarms if a["kind"] == "call-not-recorded"]
    assert refused, "the quota never filled: lower it"
    announced = [g for s in segs for g in s.manifest["gaps"]
                 if g["reason"].startswith("call not recorded")]
    assert len(announced) + len(recorder.unrecorded) >= len(refused)


def test_opus_parts_through_the_service(tmp_path: Path) -> None:
    """seal.codec = "opus" at a set complexity: every part decodes (as central would) to exactly
    its frames, and its loudness follows the line's audio 20 ms by 20 ms."""
    identity, recipient = generate_age_identity()
    text = config_text(tmp_path, recipient).replace(
        "[seal]\n", '[seal]\ncodec = "opus"\nopus_complexity = 2\n')
    cfg = parse_config(text)
    assert cfg.seal.opus_complexity == 2
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=4, mean_idle_s=6.0, mean_call_s=20.0, max_call_s=30.0)
    write_ring(cfg, sim.render, sim.lines, 90.0)
    drain(Recorder(cfg, recipients=[recipient], key=key))
    segs = outbox_segments(cfg)
    assert segs and audit_chain(segs, {s.device_id: DeviceTrust.of_keys(
        s.device_id, [key.public_b64]) for s in segs}) == []

    def levels(x: np.ndarray) -> np.ndarray:
        f = x[: x.size // 160 * 160].astype(float).reshape(-1, 160)
        return np.asarray(10 * np.log10(np.mean(f**2, axis=1) + 1.0))

    for s in segs:
        assert s.manifest["codec"] == "opus"
        audio, rate = open_segment_audio(s, identity)
        assert rate == RATE and audio.size == s.manifest["frames"]
        line = int(s.manifest["line"][1:]) - 1
        want = levels(sim.render(s.manifest["start_frame"], s.manifest["frames"])[:, line])
        got = levels(audio)
        sound = want > 40.0
        assert sound.sum() > 10
        assert np.corrcoef(want[sound], got[sound])[0, 1] > 0.95
