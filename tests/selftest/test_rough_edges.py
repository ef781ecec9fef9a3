"""The technician's other tools: ``devices`` without a sound card, ``sample``'s flags, rates and
errors (with ALSA's own messages kept off the terminal), ``analyze``'s rate and health lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from appliance.cli import build_parser
from tests.selftest.conftest import cli_env, noise, write_s16
from tests.selftest.test_selftest_cli import dominant, has_sound_card


def run(args: list[str], asound_conf: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=120, env=cli_env(asound_conf), cwd=cwd, check=False)


@pytest.mark.skipif(has_sound_card(), reason="this machine has a sound card")
def test_devices_says_there_is_no_sound_card(asound_conf: Path) -> None:
    p = run(["devices"], asound_conf)
    assert p.stdout.startswith("no sound card found:")
    assert "plugged in" in p.stdout and "/proc/asound/cards" in p.stdout
    p = run(["devices", "--json"], asound_conf)
    assert isinstance(json.loads(p.stdout), list) and "no sound card found" in p.stderr


def test_sample_documents_every_flag() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    sample = sub.choices["sample"]  # type: ignore[index]
    flags = [a for a in sample._actions if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= {"--device", "--channels", "--rate", "--format",
                                                     "--storage-rate", "--seconds", "--out"}
    for f in flags:
        assert f.help, f"{f.option_strings[0]} has no help"


@pytest.mark.parametrize("storage_rate", [8000, 16000])
def test_sample_opens_the_device_at_rate_and_says_what_it_writes(
        tmp_path: Path, asound_conf: Path, storage_rate: int) -> None:
    t = np.arange(48000 * 2) / 48000
    raw = write_s16(tmp_path / "in.raw", [0.5 * np.sin(2 * np.pi * 1000 * t),
                                          0.5 * np.sin(2 * np.pi * 2500 * t)])
    out = tmp_path / "take.wav"
    p = run(["sample", "--device", f"filecap:FILE={raw}", "--channels", "2", "--rate", "48000",
             "--format", "S16_LE", "--storage-rate", str(storage_rate), "--seconds", "1",
             "--out", str(out)], asound_conf)
    assert p.returncode == 0, p.stderr
    assert f"2 ch, {storage_rate} Hz, 1.00 s" in p.stdout and "(S16_LE, 2 ch, 48000 Hz)" in p.stdout
    assert "the device ran at 48000 Hz" in p.stdout and f"resampled to {storage_rate} Hz" in p.stdout
    data, rate = soundfile.read(out)
    assert rate == storage_rate and data.shape == (storage_rate, 2)
    assert abs(dominant(data[storage_rate // 10:, 0], rate) - 1000) < 3
    assert abs(dominant(data[storage_rate // 10:, 1], rate) - 2500) < 3


def test_sample_errors_name_its_flags_and_keep_alsa_lib_quiet(tmp_path: Path,
                                                              asound_conf: Path) -> None:
    raw = write_s16(tmp_path / "two.raw", [noise(1.5, -60, 1), noise(1.5, -60, 2)])
    p = run(["sample", "--device", f"two:FILE={raw}", "--channels", "4", "--seconds", "1",
             "--out", str(tmp_path / "x.wav")], asound_conf)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "--channels 4" in p.stderr and "capture." not in p.stderr
    assert "has at most 2" in p.stderr
    p = run(["sample", "--device", "no-such-pcm", "--seconds", "1", "--out",
             str(tmp_path / "x.wav")], asound_conf)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "ALSA lib" not in p.stderr and "'no-such-pcm' cannot be opened" in p.stderr


def test_analyze_reports_the_files_rate_and_health_per_channel(tmp_path: Path,
                                                               asound_conf: Path) -> None:
    rate = 44100
    t = np.arange(rate * 2) / rate
    x = np.stack([0.01 * np.sin(2 * np.pi * 440 * t),                 # clean
                  0.1 * np.sin(2 * np.pi * 50 * t) + 0.05,             # 50 Hz hum + 5 % DC
                  np.clip(2 * np.sin(2 * np.pi * 300 * t), -1, 1)], 1)  # clipped
    wav = tmp_path / "a.wav"
    soundfile.write(wav, x, rate, subtype="PCM_16")
    p = run(["analyze", str(wav)], asound_conf)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"{wav}: 2.0 s at 44100 Hz (analysed at 8000 Hz), 3 line(s)")
    health = {ln.split()[1]: ln for ln in lines if ln.startswith("health ")}
    assert set(health) == {"L1", "L2", "L3"}
    assert health["L1"].endswith(" ok")
    assert "HUM 50 Hz" in health["L2"] and "DC OFFSET" in health["L2"]
    assert "CLIPPING" in health["L3"] and "HUM" not in health["L3"]
    doc = json.loads(run(["analyze", str(wav), "--json"], asound_conf).stdout)
    assert (doc["file_rate"], doc["rate"]) == (44100, 8000)
