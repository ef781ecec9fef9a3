"""The capture loop into a real ring journal; file and simulator sources continue exactly."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile

from appliance.audio.simsource import SimulatorSource
from appliance.audio.simulator import LineSimulator
from appliance.audio.source import SourceExhausted, open_source
from appliance.audio.wavfile import WavSource
from appliance.buffer import Flags, Record, RingReader
from appliance.capture import downtime_frames, run_capture
from appliance.config import Config, parse_config
from tests.capture.conftest import sine_frames


def sim_config(state: Path, seconds: float, slot_size: int = 8192) -> Config:
    return parse_config(f"""
[paths]
state_dir = "{state}"
[[capture]]
name = "main"
source = "simulator"
sim_lines = 4
sim_seed = 3
realtime = false
rt_priority = 0
stop_after_s = {seconds}
[ring]
size_mb = 4
slot_size = {slot_size}
""")


def journal(path: Path) -> list[Record]:
    reader = RingReader(path)
    try:
        newest = reader.newest_seq()
        oldest = reader.oldest_seq()
        assert newest is not None and oldest is not None
        out = [reader.get(s) for s in range(oldest, newest + 1)]
    finally:
        reader.close()
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_simulator_into_ring_then_restart_continues_sample_exact(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path, 3.0)
    run_capture(cfg, cfg.capture[0], threading.Event())
    status = json.loads((cfg.run_dir / "capture-main.json").read_text())
    assert status["state"] == "finished" and status["frames_captured"] == 24000
    assert [ln["line"] for ln in status["lines"]] == ["L1", "L2", "L3", "L4"]
    # The box restarts with a longer run: capture continues where the journal ends.
    cfg2 = sim_config(tmp_path, 5.0)
    run_capture(cfg2, cfg2.capture[0], threading.Event())
    records = journal(cfg.ring_path("main"))
    assert not any(r.flags for r in records), "a deterministic source loses nothing"
    pos = 0
    for r in records:
        assert r.frame_pos == pos and r.rate == 8000 and r.channels == 4
        assert len(r.payload) <= 8192 - 96  # blocks were split to fit the slots
        pos += r.frames
    assert pos == 40000
    stored = np.frombuffer(b"".join(r.payload for r in records), "<i2").reshape(-1, 4)
    sim = LineSimulator(4, 8000, 3, mean_idle_s=8.0, mean_call_s=20.0, max_call_s=60.0)
    assert np.array_equal(stored, sim.render(0, 40000))
    # Record times follow the frame count from one anchor per run.
    first_run = [r for r in records if r.frame_pos < 24000]
    for a, b in zip(first_run, first_run[1:], strict=False):
        assert abs(b.mono_ns - a.mono_ns - (b.frame_pos - a.frame_pos) * 125_000) <= 1


def test_simulator_open_at_a_frame_continues_the_simulation() -> None:
    sim = LineSimulator(3, 8000, 9)
    src = SimulatorSource(sim, channels=3, realtime=False, end_frame=20000)
    src.open(12345)
    got = []
    with pytest.raises(SourceExhausted):
        while True:
            got.append(src.read())
    assert got[0].frame_pos == 12345
    assert np.array_equal(np.concatenate([b.pcm for b in got]), sim.render(12345, 20000 - 12345))


def test_wav_at_storage_rate_continues_sample_exact(tmp_path: Path) -> None:
    wav = tmp_path / "lines.wav"
    rng = np.random.default_rng(5)
    pcm = rng.integers(-20000, 20000, size=(30000, 3), dtype=np.int16)
    soundfile.write(wav, pcm, 8000, subtype="PCM_16")
    src = WavSource(wav, storage_rate=8000)
    src.open(7777)
    out = []
    with pytest.raises(SourceExhausted):
        while True:
            out.append(src.read())
    assert out[0].frame_pos == 7777
    assert np.array_equal(np.concatenate([b.pcm for b in out]), pcm[7777:])


def read_all(src: WavSource, start: int) -> np.ndarray:
    src.open(start)
    out = []
    try:
        while True:
            out.append(src.read().pcm)
    except SourceExhausted:
        pass
    finally:
        src.close()
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resampled_wav_continuation_matches_an_uninterrupted_run(tmp_path: Path,
                                                                rate: int) -> None:
    wav = tmp_path / "lines.wav"
    soundfile.write(wav, sine_frames(2, rate, 3.0, amplitude=0.7), rate, subtype="FLOAT")
    whole = read_all(WavSource(wav, storage_rate=8000), 0)
    assert abs(whole.shape[0] - 24000) <= 1
    for start in (9001, 16000):
        part = read_all(WavSource(wav, storage_rate=8000), start)
        assert part.shape[0] == whole.shape[0] - start
        diff = np.abs(part.astype(np.int32) - whole[start:].astype(np.int32))
        assert diff.max() <= 1, f"restart at {start}: differs by {diff.max()} LSB"


def test_wav_source_from_config_and_bad_path(tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    soundfile.write(wav, np.zeros((800, 2), np.int16), 8000, subtype="PCM_16")
    cfg = parse_config(f'[[capture]]\nsource = "wav"\nwav_path = "{wav}"\nrealtime = false\n')
    src = open_source(cfg.capture[0])
    src.open(0)
    assert src.read().pcm.shape == (800, 2)
    src.close()
    bad = parse_config(f'[[capture]]\nsource = "wav"\nwav_path = "{tmp_path / "nope.wav"}"\n')
    with pytest.raises(Exception, match=r"capture.wav_path .*nope.wav: cannot be read"):
        open_source(bad.capture[0])


def test_restart_gap_of_a_live_device_uses_monotonic_time_within_a_boot() -> None:
    rec = Record(stream_id=1, seq=9, boot_id=bytes(16), mono_ns=50 * 10**9, wall_ns=10**18,
                 frame_pos=1000, frames=800, channels=2, sample_format=1,  # type: ignore[arg-type]
                 rate=8000, flags=Flags.NONE, gap_frames=0, payload=b"")
    end_mono, end_wall = 50 * 10**9 + 10**8, 10**18 + 10**8  # the record lasts 0.1 s
    # Same boot: both clocks moved 3 s (the wall clock 0.5 s more, NTP): monotonic wins.
    assert downtime_frames(rec, rate=8000, mono_now=end_mono + 3 * 10**9,
                           wall_now=end_wall + 35 * 10**8) == 24000
    # After a reboot the monotonic clock restarted: the wall clock is all there is.
    assert downtime_frames(rec, rate=8000, mono_now=10**9, wall_now=end_wall + 60 * 10**9) \
        == 480000
