"""PCI masking through the real recorder service: ring journal -> recorder -> sealed segment ->
decrypt. The phone lines are simulated (appliance.audio.simulator); each simulated call begins
with DTMF digits, which must be gone from the stored audio and from every piece of metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.audio import dtmf
from appliance.audio.dsp import bin_powers
from appliance.audio.simulator import LineSimulator
from appliance.config import Config
from appliance.recorder import pci
from appliance.recorder.service import Recorder
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import SealedSegment
from linerec_contract.trust import DeviceTrust
from linerec_contract.verify import audit_chain, open_segment_audio, open_segment_sensitive
from tests.recorder.recorder_support import (
    DEFAULT_RECORDER,
    RATE,
    drain,
    outbox_segments,
    recorder_config,
    write_ring,
)


def make_config(state: Path, recipient: str, extra: str = "") -> Config:
    return recorder_config(state, recipient, device="pci-test",
                           recorder=f"{DEFAULT_RECORDER}\n{extra}")


def run(tmp_path: Path, extra: str, seconds: float = 120.0, seed: int = 11,
        steps_before_crash: int | None = None) -> tuple[list[SealedSegment], str, LineSimulator, Config]:
    identity, recipient = generate_age_identity()
    cfg = make_config(tmp_path, recipient, extra)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=seed, mean_idle_s=8.0, mean_call_s=20.0, max_call_s=40.0)
    write_ring(cfg, sim.render, 2, seconds)
    rec = Recorder(cfg, recipients=[recipient], key=key)
    if steps_before_crash is not None:
        for _ in range(steps_before_crash):
            rec.step()
        del rec  # a crash: what was not checkpointed is lost
        rec = Recorder(cfg, recipients=[recipient], key=key)
    drain(rec)
    segs = outbox_segments(cfg)
    assert [s.seq for s in segs] == list(range(len(segs)))
    assert audit_chain(segs, {s.device_id: DeviceTrust.of_keys(s.device_id, [key.public_b64])
                               for s in segs}) == []
    return segs, identity, sim, cfg


def digit_power_db(x: np.ndarray, digit: str) -> float:
    """Goertzel power (dBFS, per tone, the weaker of the pair) over a digit's window."""
    low, high = dtmf.digit_freqs(digit)
    p = bin_powers((x.astype(np.float64) / 32768.0)[None, :], [low, high], RATE)[0]
    return float(10 * np.log10(max(float(p.min()), 1e-15)))


def truth_tones(sim: LineSimulator, line: int, total: int) -> list[tuple[str, int, int]]:
    out = []
    step = sim.tone_frames + sim.pause_frames
    for c in sim.calls_between(0, total):
        if c.line == line:
            for i, d in enumerate(c.digits):
                out.append((d, c.start_frame + i * step, c.start_frame + i * step + sim.tone_frames))
    return out


def test_masked_export_holds_no_dtmf(tmp_path: Path) -> None:
    segs, identity, sim, _ = run(tmp_path, "pci_masking = true")
    total = int(120.0 * RATE)
    checked = 0
    masked_notes = 0
    for seg in segs:
        m = seg.manifest
        line = int(m["line"][1:]) - 1
        audio, _ = open_segment_audio(seg, identity)
        start, frames = m["start_frame"], m["frames"]
        source = sim.render(start, frames)[:, line]
        # 1. The detector itself finds no digit in what was stored.
        assert dtmf.detect(audio) == []
        # 2. A Goertzel filter over each true tone finds nothing left of it.
        for digit, a, b in truth_tones(sim, line, total):
            if a >= start and b <= start + frames:
                before = digit_power_db(source[a - start:b - start], digit)
                after = digit_power_db(audio[a - start:b - start], digit)
                assert before > -20.0 and after < -90.0, (digit, before, after)
                checked += 1
        # 3. Outside the masked spans, the audio is the source, sample for sample.
        keep = np.ones(frames, dtype=bool)
        for g in m["gaps"]:
            if g["reason"] == "pci-masked":
                masked_notes += 1
                keep[g["at_frame"] - start:g["at_frame"] - start + g["frames"]] = False
        assert np.array_equal(audio[keep], source[keep])
        assert not np.any(audio[~keep])
        # 4. No digit anywhere: not in the clear manifest, not in the sealed metadata.
        sens = open_segment_sensitive(seg, identity)
        assert "dialled" not in sens
        assert all(e["kind"] != "dtmf" and "digit" not in e for e in sens.get("events", []))
        assert "digit" not in json.dumps(m)
    assert checked >= 10 and masked_notes >= checked
    print(f"masked export: {checked} digits checked, {masked_notes} masked spans")


def test_comfort_noise_fills_at_the_noise_floor(tmp_path: Path) -> None:
    segs, identity, sim, _ = run(tmp_path, 'pci_masking = true\npci_mask_mode = "comfort-noise"', 80.0)
    spans = 0
    for seg in segs:
        m = seg.manifest
        audio, _ = open_segment_audio(seg, identity)
        assert dtmf.detect(audio) == []
        for g in m["gaps"]:
            if g["reason"] == "pci-masked":
                piece = audio[g["at_frame"] - m["start_frame"]:][: g["frames"]]
                rms = 20 * np.log10(max(float(np.sqrt(np.mean((piece / 32768.0) ** 2))), 1e-9))
                assert -80.0 < rms < -55.0, rms  # the simulator's idle line is about -65 dBFS
                spans += 1
    assert spans >= 5


def test_without_masking_digits_are_sealed_and_audio_is_exact(tmp_path: Path) -> None:
    segs, identity, sim, _ = run(tmp_path, "")
    total = int(120.0 * RATE)
    found = 0
    for seg in segs:
        m = seg.manifest
        line = int(m["line"][1:]) - 1
        audio, _ = open_segment_audio(seg, identity)
        assert np.array_equal(audio, sim.render(m["start_frame"], m["frames"])[:, line])
        assert not [g for g in m["gaps"] if g["reason"].startswith("pci")]
        if m["part"] == 0:
            sens = open_segment_sensitive(seg, identity)
            truth = [c for c in sim.calls_between(0, total)
                     if c.line == line and m["start_frame"] <= c.start_frame
                     < m["start_frame"] + m["frames"]]
            assert truth, m
            assert sens["dialled"].startswith(truth[0].digits)
            assert [e["digit"] for e in sens["events"] if e["kind"] == "dtmf"][:len(truth[0].digits)] \
                == list(truth[0].digits)
            found += 1
    assert found >= 4


@pytest.mark.parametrize("crash_after", [2, 9, 25])
def test_masked_replay_after_a_crash_gives_the_same_bytes(tmp_path: Path, crash_after: int) -> None:
    extra = 'pci_masking = true\npci_mask_mode = "comfort-noise"'
    ref, identity, _, _ = run(tmp_path / "ref", extra, 100.0)
    got, identity2, _, _ = run(tmp_path / "crash", extra, 100.0, steps_before_crash=crash_after)
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert a.manifest["gaps"] == b.manifest["gaps"]
        assert np.array_equal(open_segment_audio(a, identity)[0], open_segment_audio(b, identity2)[0])
        assert open_segment_sensitive(a, identity) == open_segment_sensitive(b, identity2)


def _render_with(sim: LineSimulator, extra: dict[int, np.ndarray]) -> Any:
    def render(pos: int, n: int) -> np.ndarray:
        out = sim.render(pos, n).astype(np.int32)
        for at, sig in extra.items():
            a, b = max(pos, at), min(pos + n, at + len(sig))
            if a < b:
                out[a - pos:b - pos, 0] += sig[a - at:b - at]
        return np.clip(out, -32768, 32767).astype(np.int16)
    return render


def test_pause_window_by_digits_and_by_command(tmp_path: Path) -> None:
    """``*1`` opens a pause window, ``*2`` closes it; a command from central does the same."""
    identity, recipient = generate_age_identity()
    cfg = make_config(tmp_path, recipient, 'pci_pause_sequence = "*1"\npci_resume_sequence = "*2"')
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    sim = LineSimulator(2, RATE, seed=4, mean_idle_s=3600.0, mean_call_s=50.0, max_call_s=60.0,
                        first_call_s=2.0)
    call = sim.calls_between(0, 60 * RATE)[0]
    t_pause = call.start_frame + 5 * RATE
    t_resume = call.start_frame + 12 * RATE

    def digits(s: str) -> np.ndarray:
        return np.rint(dtmf.sequence(s, level_dbfs=-12.0) * 32768).astype(np.int32)

    render = _render_with(sim, {t_pause: digits("*1"), t_resume: digits("*2")})
    lines = [c for c in sim.calls_between(0, 60 * RATE) if c.line == 0]
    assert lines and lines[0] == call
    # Central pauses line L2 for 3 s during its first call, by command (fleet handler API).
    call2 = next(c for c in sim.calls_between(0, 60 * RATE) if c.line == 1)
    wall0 = 1_700_000_000_000_000_000
    c_on = call2.start_frame + 4 * RATE
    pci.request_pause(cfg.state_dir, "L2", True, wall_ns=wall0 + c_on * 125_000)
    pci.request_pause(cfg.state_dir, "L2", False, wall_ns=wall0 + (c_on + 3 * RATE) * 125_000)
    write_ring(cfg, render, 2, 60.0)
    drain(Recorder(cfg, recipients=[recipient], key=key))
    segs = outbox_segments(cfg)
    pauses = {s.manifest["line"]: [g for g in s.manifest["gaps"] if g["reason"] == "pci-pause"]
              for s in segs if s.manifest["part"] == 0}
    (p1,) = pauses["L1"]
    assert p1["by"] == "digits"
    assert abs(p1["at_frame"] - (t_pause + 2 * sim.tone_frames + sim.pause_frames)) < 0.05 * RATE
    assert abs(p1["at_frame"] + p1["frames"] - t_resume) < 0.05 * RATE
    (p2,) = pauses["L2"]
    assert p2["by"] == "command"
    assert p2["at_frame"] == c_on and p2["frames"] == 3 * RATE
    for seg in segs:
        audio, _ = open_segment_audio(seg, identity)
        for g in seg.manifest["gaps"]:
            if g["reason"] == "pci-pause":
                a = g["at_frame"] - seg.manifest["start_frame"]
                assert not np.any(audio[a:a + g["frames"]])
