"""A self-test on a box that is recording: the capture stage holds the device, so the line
checks read the newest audio from the journal and recording is never interrupted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from appliance.config import load_config
from appliance.selftest import Verdict, run_selftest
from tests.monitor.test_monitor_tmux import write_config


def test_line_checks_read_the_journal_while_capture_runs(tmp_path: Path) -> None:
    cfg_file = write_config(tmp_path, masking=False)  # 4 lines: -80 dBFS noise, L3 a -20 dBFS tone
    cfg = load_config(cfg_file)
    capture = subprocess.Popen([sys.executable, "-m", "appliance", "stage", "capture", "--config",
                                str(cfg_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status = tmp_path / "state" / "run" / "capture-main.json"
    try:
        deadline = time.monotonic() + 30
        while not status.exists() or json.loads(status.read_text())["frames_captured"] < 8000 * 3:
            assert capture.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        res = {(r.check, r.subject): r for r in run_selftest(
            cfg, only=["capture-device", "line-signal", "line-hum"]).results}
        assert capture.poll() is None, "the self-test stopped capture"
    finally:
        capture.terminate()
        capture.communicate(timeout=30)
    assert capture.returncode == 0
    dev = res[("capture-device", "main")]
    assert dev.verdict is Verdict.PASS and dev.value == "4 ch"
    assert dev.detail.startswith("in use by the capture stage: wav ")
    levels = {ln: res[("line-signal", ln)].value for ln in ("L1", "L2", "L3", "L4")}
    assert isinstance(levels["L3"], float) and abs(levels["L3"] - -20.0) < 0.5
    assert all(isinstance(levels[ln], float) and levels[ln] < -60 for ln in ("L1", "L4"))
    # Once capture has stopped, the status says so and the self-test opens the source itself.
    res2 = run_selftest(cfg, only=["capture-device"]).results
    assert res2[0].verdict is Verdict.SKIP and res2[0].value == "wav"


def test_loopback_while_recording_takes_the_tone_from_the_journal(tmp_path: Path) -> None:
    """The capture stage records a WAV whose line 3 carries a 1 kHz tone standing in for the
    plug's return (no plug exists here); the loopback step reads it from the journal, and
    capture keeps running."""
    import numpy as np
    import soundfile

    rate = 8000
    n = rate * 30
    t = np.arange(n) / rate
    x = np.random.default_rng(2).standard_normal((n, 3)) * 10 ** (-80 / 20)
    x[:, 2] += np.sqrt(2) * 10 ** (-20 / 20) * np.sin(2 * np.pi * 1004 * t)
    wav = tmp_path / "lines.wav"
    soundfile.write(str(wav), x, rate, subtype="PCM_16")
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[capture]]\nsource = "wav"\nwav_path = "{wav}"\nrealtime = true\n'
        f'[selftest]\ncapture_s = 1.5\nplayback_device = "play:FILE={tmp_path / "p.raw"}"\n'
        'loopback_lines = ["L3"]\n')
    capture = subprocess.Popen([sys.executable, "-m", "appliance", "stage", "capture", "--config",
                                str(cfg_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status = tmp_path / "state" / "run" / "capture-main.json"
    base = [sys.executable, "-m", "appliance", "selftest", "--config", str(cfg_file)]
    try:
        deadline = time.monotonic() + 30
        while not status.exists():
            assert capture.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        first = subprocess.run([*base, "--only", "loopback"], capture_output=True, text=True,
                               timeout=60, check=False)
        assert first.returncode == 1 and "plug the test plug into line L3" in first.stdout
        p = subprocess.run([*base, "--continue", "--json"], capture_output=True, text=True,
                           timeout=60, check=False)
        assert capture.poll() is None, "the self-test stopped capture"
    finally:
        capture.terminate()
        capture.communicate(timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)["results"][0]
    assert (r["check"], r["subject"], r["verdict"]) == ("loopback", "L3", "PASS")
    assert abs(r["value"] - 1004.0) < 5.0
    assert r["detail"].endswith("(capture is running)") and "; from journal " in r["detail"]
