"""What a restart of the recorder must never do silently: spools lost while the box was down
become exact gap notes and alarms (never silence), and every other sample of the call is the
one an uninterrupted run seals.

The phone lines are simulated (appliance.audio.simulator)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from appliance.audio.simulator import LineSimulator
from appliance.config import Config
from appliance.recorder.service import Recorder
from appliance.seal import DeviceKey, audit_chain, generate_age_identity
from tests.recorder.recorder_support import (
    RATE,
    drain,
    outbox_segments,
    recorder_config,
    write_ring,
)
from tests.recorder.sealed_calls import compare_with_reference, sealed_calls

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
    assert audit_chain(segs, {key.key_id: key.public_b64}) == []
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
