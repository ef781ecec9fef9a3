"""What a restart of the recorder must never do silently: spools lost while the box was down
become exact gap notes and alarms (never silence), and every other sample of the call is the
one an uninterrupted run seals.

The phone lines are simulated (appliance.audio.simulator)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.audio.simulator import LineSimulator
from appliance.config import Config, parse_config
from appliance.recorder.service import Recorder
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.trust import DeviceTrust
from linerec_contract.verify import audit_chain
from tests.recorder.recorder_support import (
    RATE,
    config_text,
    drain,
    outbox_segments,
    recorder_config,
    write_ring,
)
from tests.recorder.sealed_calls import check_call_shape, compare_with_reference, sealed_calls

RECORDER = "max_segment_s = 20.0\ncommit_interval_s = 0.2\npci_masking = true"


def twin_boxes(tmp_path: Path, recipient: str, lines: int, seconds: float,
               seed: int) -> tuple[Config, Config, LineSimulator]:
    """Two boxes with the same device id and the same journal: a reference and a test box."""
    ref = recorder_config(tmp_path / "reference", recipient, device="restart-test",
                          recorder=RECORDER)
    cfg = recorder_config(tmp_path / "box", recipient, device="restart-test", recorder=RECORDER)
    sim = LineSimulator(lines, RATE, seed=seed, mean_idle_s=5.0, mean_call_s=25.0,
                        max_call_s=45.0)
    write_ring(ref, sim.render, lines, seconds)
    cfg.ring_path("main").parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ref.ring_path("main"), cfg.ring_path("main"))
    return ref, cfg, sim


def test_lost_spools_become_gap_notes_and_alarms(tmp_path: Path) -> None:
    identity, recipient = generate_age_identity()
    ref_cfg, cfg, _ = twin_boxes(tmp_path, recipient, 3, 150.0, seed=31)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    reference = Recorder(ref_cfg, recipients=[recipient], key=key)
    drain(reference)
    ref_calls = sealed_calls(outbox_segments(ref_cfg), identity)

    rec = Recorder(cfg, recipients=[recipient], key=key)
    state_path = cfg.state_dir / "recorder" / "state.json"
    while True:
        assert rec.step(), "the journal ended before two lines had 3 s of an open part"
        rec.checkpoint()
        lines = json.loads(state_path.read_text())["streams"]["main"]["lines"]
        open_parts = [ln for ln in lines if ln["call"] is not None and ln["spool_frames"] > 3 * RATE]
        if len(open_parts) >= 2:
            break
    del rec  # the box goes down with this state on disk
    removed, cut = open_parts[0], open_parts[1]
    spools = cfg.state_dir / "recorder" / "spool"
    (spools / f"{removed['line']}.{removed['spool_gen']}.pcm").unlink()
    keep = cut["spool_frames"] // 3
    os.truncate(spools / f"{cut['line']}.{cut['spool_gen']}.pcm", keep * 2)

    rec = Recorder(cfg, recipients=[recipient], key=key)
    expected = {
        removed["call"]["call_id"]: {"reason": "spool-lost",
                                     "at_frame": removed["call"]["part_start_frame"],
                                     "frames": removed["spool_frames"]},
        cut["call"]["call_id"]: {"reason": "spool-lost",
                                 "at_frame": cut["call"]["part_start_frame"] + keep,
                                 "frames": cut["spool_frames"] - keep},
    }
    alarms = {(a["call_id"], a["at_frame"], a["frames"], a["spool"])
              for a in rec.alarms if a["kind"] == "spool-lost"}
    assert alarms == {(removed["call"]["call_id"], removed["call"]["part_start_frame"],
                       removed["spool_frames"], "missing"),
                      (cut["call"]["call_id"], cut["call"]["part_start_frame"] + keep,
                       cut["spool_frames"] - keep, "short")}
    assert rec.status()["alarms"] == rec.alarms
    drain(rec)
    segs = outbox_segments(cfg)
    assert [s.seq for s in segs] == list(range(len(segs)))
    assert audit_chain(segs, {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64])
                               for s in segs}) == []
    got = sealed_calls(segs, identity)
    for cid, note in expected.items():
        notes = [g for p in got[cid] for g in p.gaps if g["reason"] == "spool-lost"]
        assert notes == [note], (cid, notes)
    # The truncated spool's first third is a part of its own; the next part starts after the
    # lost frames.
    cut_parts = got[cut["call"]["call_id"]]
    before = [p for p in cut_parts if p.start + p.frames == expected[cut["call"]["call_id"]]["at_frame"]]
    assert len(before) == 1 and before[0].frames >= keep
    # Everything else of every call, and every other call, is what the clean run sealed.
    assert compare_with_reference(ref_calls, got, loss_reasons=("spool-lost",)) == 2


STOP_RECORDER = "max_segment_s = 20.0\ncommit_interval_s = 0.2\nstop_delay_s = 4.0"
HOLD = 5 * RATE  # stop delay + 1 s stays in the spool at a stop (docs/recorder.md)
WALL0 = 1_700_000_000_000_000_000


def append_journal(cfg: Config, sim: LineSimulator, start: int, end: int, *,
                   downtime: int = 0) -> None:
    """Append [start, end) of ``sim`` as capture would; ``downtime`` frames before ``start``
    were not captured (capture's restart writes them as a gap record)."""
    from appliance.buffer import Flags, RingWriter, SampleFormat

    writer = RingWriter.open(cfg.ring_path("main"), stream_id=1, size_bytes=64 * 2**20,
                             sync_interval_s=0.5)
    try:
        if downtime:
            writer.append(b"", frames=0, channels=sim.lines, rate=RATE,
                          sample_format=SampleFormat.S16_LE, frame_pos=start, flags=Flags.GAP,
                          gap_frames=downtime, wall_ns=WALL0 + start * 125_000)
        for pos in range(start, end, 160):
            writer.append(sim.render(pos, 160).tobytes(), frames=160, channels=sim.lines,
                          rate=RATE, sample_format=SampleFormat.S16_LE, frame_pos=pos,
                          wall_ns=WALL0 + pos * 125_000)
    finally:
        writer.close()


def run_stage_until_stopped(cfg: Config, cfg_path: Path, records: int) -> None:
    """Start the recorder stage, let it consume ``records`` journal records, stop it with
    SIGTERM as the box's stop does, and expect a clean exit."""
    import signal
    import subprocess
    import time

    from appliance.supervisor import stage_argv

    proc = subprocess.Popen(stage_argv(cfg_path, "recorder"), stderr=subprocess.PIPE)
    status = cfg.run_dir / "recorder.json"
    deadline = time.monotonic() + 60.0
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
            assert time.monotonic() < deadline, "the recorder did not consume the journal"
            try:
                if json.loads(status.read_text())["cursors"]["main"] == records:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status.unlink()


def test_clean_stop_seals_open_calls_and_the_restart_continues_them(tmp_path: Path) -> None:
    """SIGTERM mid-call seals the audio so far; capture is down for 6 s; after the restart the
    call still going on continues as the next part of the same call, the call that ended while
    the box was down gets its last part, and the downtime is an exact gap note."""
    identity, recipient = generate_age_identity()
    text = config_text(tmp_path, recipient, device="stop-test", recorder=STOP_RECORDER)
    cfg = parse_config(text)
    cfg_path = tmp_path / "appliance.toml"
    cfg_path.write_text(text)
    sim = LineSimulator(3, RATE, seed=8, mean_idle_s=5.0, mean_call_s=30.0, max_call_s=60.0)
    stop, restart, end = 46 * RATE, 52 * RATE, 80 * RATE
    truth = sim.calls_between(0, end)
    going_on = [c for c in truth if c.start_frame + 12 * RATE <= stop and c.end_frame > restart + 6 * RATE]
    ended = [c for c in truth if c.start_frame + 8 * RATE <= stop < c.end_frame < restart - RATE]
    assert [c.line for c in going_on] == [2] and [c.line for c in ended] == [0], truth

    cfg.ring_path("main").parent.mkdir(parents=True, exist_ok=True)
    append_journal(cfg, sim, 0, stop)
    run_stage_until_stopped(cfg, cfg_path, stop // 160)
    first = {s.manifest["line"]: s.manifest for s in outbox_segments(cfg)
             if s.manifest["start_frame"] + s.manifest["frames"] > stop - HOLD - RATE}
    assert not list(cfg.outbox_dir.glob(".*.prep"))
    for line in ("L1", "L3"):
        m = first[line]
        # Sealed and committed at the stop: all but the held-back tail, and not the last part.
        assert m["start_frame"] + m["frames"] == stop - HOLD and not m["last_part"], m

    append_journal(cfg, sim, restart, end, downtime=restart - stop)
    run_stage_until_stopped(cfg, cfg_path, end // 160 - (restart - stop) // 160 + 1)
    segs = outbox_segments(cfg)
    key = DeviceKey.load(cfg.keys_dir / "device.key")
    assert [s.seq for s in segs] == list(range(len(segs)))
    assert audit_chain(segs, {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64])
                               for s in segs}) == []
    calls = sealed_calls(segs, identity)
    downtime = {"reason": "capture-gap", "at_frame": stop, "frames": restart - stop}
    across = {c.line: c for c in truth if c.start_frame < stop < c.end_frame}
    assert sorted(across) == [0, 1, 2], across  # L2's call began 1 s before the stop
    seen = set()
    for cid, parts in calls.items():
        check_call_shape(cid, parts)
        line = int(cid.split("-")[0][1:]) - 1
        for p in parts:  # every sealed sample is the input's
            assert np.array_equal(p.audio, sim.render(p.start, p.frames)[:, line]), (cid, p.part)
        holes = [(a.start + a.frames, b.start) for a, b in zip(parts, parts[1:], strict=False)
                 if b.start != a.start + a.frames]
        notes = [g for p in parts for g in p.gaps if g["reason"] == "capture-gap"]
        if not parts[0].start < stop <= parts[-1].start + parts[-1].frames:
            assert not holes and not notes, cid
            continue
        seen.add(line)
        if across[line].end_frame > restart + RATE:
            # Going on after the restart: the same call id, consecutive parts, one hole (the
            # downtime), noted on the part after it.
            assert holes == [(stop, restart)] and notes == [downtime], (cid, holes, notes)
            assert [p for p in parts if p.start == restart][0].gaps[0] == downtime
            assert parts[-1].last == (across[line].end_frame + 6 * RATE < end), cid
        else:
            # Ended while the box was down: its tail is its last part, noting the downtime.
            assert not holes and parts[-1].last, cid
            assert parts[-1].start + parts[-1].frames == stop and parts[-1].gaps == [downtime]
    assert seen == {0, 1, 2}
    # No other call on those lines around the restart: nothing was split or dropped.
    for line, c in across.items():
        near = [cid for cid, parts in calls.items() if cid.startswith(f"L{line + 1}-")
                and any(c.start_frame - 3 * RATE <= p.start < c.end_frame for p in parts)]
        assert len(near) == 1, (line, near)


def test_crash_while_a_stopped_call_waits_for_its_restart(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After a clean stop, the calls waiting for the audio after the restart (continue or end)
    are in the checkpoint: a crash at any step of that window seals exactly what a run without
    the crash seals."""
    from appliance.recorder import service

    monkeypatch.setattr(service, "MAX_BATCH", 16)  # small steps: crashes land inside the window
    _, recipient = generate_age_identity()
    sim = LineSimulator(3, RATE, seed=8, mean_idle_s=5.0, mean_call_s=30.0, max_call_s=60.0)
    stop, restart, end = 46 * RATE, 52 * RATE, 70 * RATE
    base = recorder_config(tmp_path / "base", recipient, device="stop-test",
                           recorder=STOP_RECORDER)
    key = DeviceKey.load_or_create(base.keys_dir / "device.key")
    base.ring_path("main").parent.mkdir(parents=True)
    append_journal(base, sim, 0, stop)
    first = Recorder(base, recipients=[recipient], key=key)
    drain(first)
    first.seal_open_parts()
    append_journal(base, sim, restart, end, downtime=restart - stop)

    def box(name: str) -> Config:
        shutil.copytree(base.state_dir, tmp_path / name)
        return recorder_config(tmp_path / name, recipient, device="stop-test",
                               recorder=STOP_RECORDER)

    def manifests(cfg: Config) -> list[dict[str, Any]]:
        out = []
        for s in outbox_segments(cfg):
            m = dict(s.manifest)
            for k in ("created_wall_ns", "prev_manifest_sha256", "payload_sha256",
                      "payload_bytes", "sealed_meta", "signature"):
                m.pop(k, None)
            out.append(m)
        return out

    ref = box("reference")
    rec = Recorder(ref, recipients=[recipient], key=key)
    drain(rec)
    want = manifests(ref)
    waiting = []
    for crash_after in range(1, 40, 5):
        cfg = box(f"crash-{crash_after}")
        rec = Recorder(cfg, recipients=[recipient], key=key)
        for _ in range(crash_after):
            rec.step()
        rec.checkpoint()
        waiting.append(sum(1 for s in rec.streams for ln in s.lines
                           if ln.call is not None and ln.call.resumed is not None))
        del rec  # the crash
        rec = Recorder(cfg, recipients=[recipient], key=key)
        drain(rec)
        assert manifests(cfg) == want, crash_after
    # Crashes landed while calls were waiting, and after the wait was over.
    assert waiting[0] >= 1 and waiting[-1] == 0, waiting
