"""The recorder stage as a real process, SIGKILLed again and again while it seals, against an
uninterrupted run of the same journal: every call of the uninterrupted run is there, with the
same parts, the same samples and the same sealed metadata. Mixed with clean stops (SIGTERM),
which seal open calls as parts of their own, every call still holds the same samples.

The phone lines are simulated (appliance.audio.simulator): each simulated call begins with DTMF
digits, recorded here under PCI masking.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.audio.simulator import LineSimulator
from appliance.config import Config, parse_config
from appliance.recorder.service import Recorder
from appliance.supervisor import stage_argv
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.trust import DeviceTrust
from linerec_contract.verify import audit_chain
from tests.recorder.recorder_support import RATE, config_text, drain, outbox_segments, write_ring
from tests.recorder.sealed_calls import compare_with_reference, sealed_calls

RECORDER = "max_segment_s = 10.0\ncommit_interval_s = 0.2\npci_masking = true"
LINES = 3
# Long enough that a recorder catching up in large batches (reads of up to 1024 records) is
# still sealing when most of the stops land.
SECONDS = 480.0


def box(folder: Path, recipient: str) -> tuple[Config, Path]:
    text = config_text(folder, recipient, device="kill-test", recorder=RECORDER)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "appliance.toml"
    path.write_text(text)
    return parse_config(text), path


def committed(cfg: Config) -> int:
    return len(list(cfg.outbox_dir.glob("seg-*.seg")))


def checkpoint_seq(cfg: Config) -> int:
    try:
        return int(json.loads((cfg.state_dir / "recorder" / "state.json").read_text())["next_seq"])
    except (FileNotFoundError, ValueError):
        return 0


def caught_up(cfg: Config) -> bool:
    try:
        return bool(json.loads((cfg.run_dir / "recorder.json").read_text())["caught_up"])
    except (FileNotFoundError, ValueError, KeyError):
        return False


@pytest.mark.parametrize("stops", ["sigkill", "sigkill-and-sigterm"])
def test_sigkilled_recorder_seals_what_an_uninterrupted_run_seals(tmp_path: Path,
                                                                   stops: str) -> None:
    """``sigkill-and-sigterm``: every other stop is a clean one, which seals the open calls'
    audio as parts of its own; the samples of every call must still be the same."""
    identity, recipient = generate_age_identity()
    ref_cfg, _ = box(tmp_path / "reference", recipient)
    cfg, cfg_path = box(tmp_path / "killed", recipient)
    sim = LineSimulator(LINES, RATE, seed=23, mean_idle_s=6.0, mean_call_s=22.0, max_call_s=45.0)
    write_ring(ref_cfg, sim.render, LINES, SECONDS)
    cfg.ring_path("main").parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ref_cfg.ring_path("main"), cfg.ring_path("main"))
    key = DeviceKey.load_or_create(ref_cfg.keys_dir / "device.key")
    cfg.keys_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ref_cfg.keys_dir / "device.key", cfg.keys_dir / "device.key")

    reference = Recorder(ref_cfg, recipients=[recipient], key=key)
    drain(reference)
    reference.seal_open_parts()  # both runs end with a clean stop: calls still open are compared
    ref_calls = sealed_calls(outbox_segments(ref_cfg), identity)

    rng = np.random.default_rng(7)
    log_path = tmp_path / "recorder-stderr.log"
    kills: list[tuple[int, int, bool]] = []  # (checkpointed next_seq, committed, journal done)
    while len(kills) < 12:
        before = max(committed(cfg), checkpoint_seq(cfg))
        with log_path.open("ab") as log:
            proc = subprocess.Popen(stage_argv(cfg_path, "recorder"), stderr=log)
        deadline = time.monotonic() + 60.0
        # Kill only once this run has sealed something of its own, at a random instant after.
        while max(committed(cfg), checkpoint_seq(cfg)) <= before and not caught_up(cfg):
            assert proc.poll() is None, f"recorder exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the recorder sealed nothing for 60 s"
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.08)))
        done = caught_up(cfg)
        kills.append((checkpoint_seq(cfg), committed(cfg), done))
        clean = stops == "sigkill-and-sigterm" and len(kills) % 2 == 0
        os.kill(proc.pid, signal.SIGTERM if clean else signal.SIGKILL)
        assert proc.wait(timeout=60) == (0 if clean else -signal.SIGKILL)
        (cfg.run_dir / "recorder.json").unlink(missing_ok=True)
        if done:
            break
    mid_work = [k for k in kills if not k[2]]
    assert len(mid_work) >= 5, f"too few kills landed while the journal was being sealed: {kills}"
    assert all(seq > 0 and n > 0 for seq, n, _ in mid_work), kills

    final = Recorder(cfg, recipients=[recipient], key=DeviceKey.load(cfg.keys_dir / "device.key"))
    drain(final)
    final.seal_open_parts()
    segs = outbox_segments(cfg)
    assert [s.seq for s in segs] == list(range(len(segs)))
    assert audit_chain(segs, {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64])
                               for s in segs}) == []
    assert not list(cfg.outbox_dir.glob(".*.prep"))
    got = sealed_calls(segs, identity)
    assert sum(1 for parts in ref_calls.values() if parts[-1].last) >= 10
    # A killed process loses nothing the page cache holds and the journal is never lapped
    # here: no loss note is acceptable, every call must match the uninterrupted run exactly.
    compare_with_reference(ref_calls, got, loss_reasons=(), same_parts=stops == "sigkill")
    assert "ERROR" not in log_path.read_text()
    print(f"recorder stopped {len(kills)} times ({stops}, {len(mid_work)} while sealing, next_seq at "
          f"kill {[k[0] for k in kills]}): {len(segs)} segments, {len(got)} calls")
