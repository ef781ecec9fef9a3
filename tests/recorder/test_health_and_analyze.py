"""Line health and alarms, per-line settings, and `appliance analyze` on generated WAV files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from appliance.audio import callerid, dtmf, tones
from appliance.audio.simulator import LineSimulator
from appliance.config import parse_config
from appliance.recorder.callmeta import OpenCall, avoid_leaks
from appliance.recorder.health import HealthConfig, LineHealth
from linerec_contract.errors import ConfigError

RATE = 8000
NS = 1_000_000_000


def test_health_measures_hum_clipping_and_dc() -> None:
    h = LineHealth(HealthConfig())
    t = np.arange(RATE * 2) / RATE
    x = 0.01 * np.sin(2 * np.pi * 60 * t) + 0.05
    x[:100] = 1.5
    h.measure(np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16))
    rep = h.report(-60.0)
    assert rep["hum_hz"] == 60 and abs(rep["hum_dbfs"] - (-43.0)) < 1.0
    assert rep["clipped_samples"] == 100 and rep["peak_dbfs"] == 0.0
    assert abs(rep["dc_offset"] - 0.05) < 0.01
    assert h.report(-60.0)["clipped_samples"] == 0  # counters restart after each report


def test_long_call_and_silent_line_alarms_are_raised_once() -> None:
    h = LineHealth(HealthConfig(long_call_s=3600.0, silent_days=2.0))
    assert h.check_alarms(None, 0) == []
    assert h.check_alarms(3000 * RATE, 10 * NS) == []
    (a,) = h.check_alarms(3601 * RATE, 20 * NS)
    assert a["kind"] == "line-long-call"
    assert h.check_alarms(7200 * RATE, 30 * NS) == []
    assert h.check_alarms(None, 40 * NS) == []  # call over: the line was active at 30 s
    (b,) = h.check_alarms(None, 30 * NS + 2 * 86400 * NS + 1)
    assert b["kind"] == "line-silent"
    assert h.check_alarms(None, 30 * NS + 5 * 86400 * NS) == []
    restored = LineHealth(HealthConfig(silent_days=2.0))
    restored.restore(h.to_state())
    assert restored.check_alarms(None, 30 * NS + 6 * 86400 * NS) == []


def test_per_line_overrides_and_bounds() -> None:
    cfg = parse_config("""
[recorder]
pci_masking = true
tone_country = "na"
[[recorder.line]]
line = "L2"
pci_masking = false
stop_delay_s = 8.0
""")
    assert cfg.recorder.for_line("L1").pci_masking is True
    l2 = cfg.recorder.for_line("L2")
    assert l2.pci_masking is False and l2.stop_delay_s == 8.0 and l2.tone_country == "na"
    with pytest.raises(ConfigError, match="dtmf_twist_normal_db"):
        parse_config("[recorder]\ndtmf_twist_normal_db = 30\n")
    with pytest.raises(ConfigError, match="pci_pause_sequence"):
        parse_config('[recorder]\npci_pause_sequence = "*1"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config('[[recorder.line]]\nline = "L1"\nbogus = 1\n')


def test_leak_guard_drops_positions_before_facts() -> None:
    sens = {"dialled": "1234567"}
    gaps = [{"reason": "lost", "at_frame": 5, "frames": 3}]
    notes = [{"reason": "pci-masked", "at_frame": 91234567, "frames": 400}]
    s2, clear = avoid_leaks(sens, gaps, notes)
    assert s2 == sens and clear[-1] == {"reason": "pci-masked", "count": 1, "positions": "withheld"}
    s3, _ = avoid_leaks(sens, [{"reason": "lost", "at_frame": 81234567}], [])
    assert "dialled" not in s3 and "withheld" in s3


def test_call_split_keeps_open_masks_in_the_next_part() -> None:
    call = OpenCall("c", 0, 0, 0)
    call.add({"kind": "dtmf-masked", "frame": 90, "end": 130})
    before = call.split(100)
    assert before[0]["frame"] == 90 and call.events == [{"kind": "dtmf-masked", "frame": 100, "end": 130}]
    assert call.masked_digits == 1


def _wav(path: Path) -> tuple[int, int]:
    sim = LineSimulator(2, RATE, seed=3)
    x = sim.render(0, RATE * 40).astype(np.int32)
    call = next(c for c in sim.calls_between(0, RATE * 40) if c.line == 0)
    busy_at = call.end_frame + RATE // 2
    busy = np.rint(tones.render("busy", "etsi", 3.0) * 32768).astype(np.int32)
    x[busy_at:busy_at + busy.size, 0] += busy
    fsk = np.rint(callerid.fsk(callerid.build_message("5551234567", "JANE"), "v23") * 32768)
    x[100:100 + fsk.size, 1] += fsk.astype(np.int32)
    soundfile.write(path, np.clip(x, -32768, 32767).astype(np.int16), RATE)
    return busy_at, call.start_frame


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "analyze", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_analyze_prints_calls_and_events(tmp_path: Path) -> None:
    wav = tmp_path / "lines.wav"
    busy_at, start = _wav(wav)
    res = _analyze(str(wav), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    l1 = [c for c in out["calls"] if c["line"] == "L1"]
    # The busy tone ends the first call where it began, not after the 4 s stop delay.
    first = next(c for c in l1 if c["start_s"] <= start / RATE <= c["end_s"])
    assert abs(first["end_s"] - busy_at / RATE) < 0.05
    kinds = {(e["line"], e["kind"]) for e in out["events"]}
    assert ("L1", "tone") in kinds and ("L1", "dtmf") in kinds
    cid = next(e for e in out["events"] if e["kind"] == "callerid")
    assert cid["number"] == "5551234567" and cid["source"] == "v23" and cid["line"] == "L2"
    assert set(out["health"]) == {"L1", "L2"}
    text = _analyze(str(wav))
    assert text.returncode == 0 and "call  L1" in text.stdout and "dtmf" in text.stdout


def test_analyze_with_masking_shows_spans_not_digits(tmp_path: Path) -> None:
    wav = tmp_path / "lines.wav"
    _wav(wav)
    conf = tmp_path / "a.toml"
    conf.write_text("[recorder]\npci_masking = true\n")
    out = json.loads(_analyze(str(wav), "--config", str(conf), "--json").stdout)
    masked = [e for e in out["events"] if e["kind"] == "dtmf-masked"]
    assert masked and not [e for e in out["events"] if "digit" in e]


def test_analyze_rejects_bad_files(tmp_path: Path) -> None:
    missing = _analyze(str(tmp_path / "nope.wav"))
    assert missing.returncode == 2 and "nope.wav" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....not audio")
    res = _analyze(str(bad))
    assert res.returncode == 2 and "bad.wav" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    _ = dtmf
