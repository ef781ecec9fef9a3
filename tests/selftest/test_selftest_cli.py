"""``appliance selftest`` as a technician runs it: real processes, exit codes, the stored
result, JUnit output, and a multi-step loopback session that resumes in a new process (as it
would after a reboot)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.selftest.conftest import RATE, cli_env, noise, sine, write_config, write_s16

APPLIANCE = [sys.executable, "-m", "appliance"]
SECONDS = 3.5


def run(args: list[str], asound_conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*APPLIANCE, *args], capture_output=True, text=True, timeout=120,
                          env=cli_env(asound_conf), check=False)


def has_sound_card() -> bool:
    try:
        return bool(Path("/proc/asound/cards").read_text().strip()
                    .replace("--- no soundcards ---", ""))
    except OSError:
        return False


@pytest.mark.skipif(has_sound_card(), reason="this machine has a sound card")
def test_no_sound_card_fails_audio_checks_and_reports_the_others(tmp_path: Path,
                                                                  asound_conf: Path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    p = run(["selftest", "--json", "--config", str(cfg)], asound_conf)
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    res = {(r["check"], r["subject"]): r for r in doc["results"]}
    dev = res[("capture-device", "main")]
    assert dev["verdict"] == "FAIL" and dev["hint"].startswith("no sound card found")
    for check in ("line-signal", "line-noise", "line-hum", "line-dc", "line-clipping",
                  "line-call-level"):
        assert res[(check, "main")]["verdict"] == "FAIL"
        assert "fix capture-device first" in res[(check, "main")]["hint"]
    # The other checks measured something real.
    space = res[("disk-space", str(tmp_path / "state"))]
    assert space["verdict"] == "PASS" and space["value"] > 0
    assert res[("memory", "")]["verdict"] in ("PASS", "WARN") and res[("memory", "")]["value"] > 0
    assert res[("clock", "")]["verdict"] in ("PASS", "WARN", "FAIL")
    assert res[("uplink-tls", "")]["verdict"] == "SKIP" and "provision" in res[("uplink-tls", "")]["hint"]
    assert doc["verdict"] == "FAIL" and doc["complete"] is True
    # Kept on disk, and shown by status.
    kept = json.loads((tmp_path / "state" / "selftest" / "last.json").read_text())
    assert kept["results"] == doc["results"]
    st = run(["status", "--config", str(cfg)], asound_conf)
    assert "selftest FAIL" in st.stdout and "capture-device[main]" in st.stdout
    st_json = json.loads(run(["status", "--json", "--config", str(cfg)], asound_conf).stdout)
    assert st_json["selftest"]["verdict"] == "FAIL"


def test_unknown_check_is_bad_usage_naming_the_accepted(tmp_path: Path, asound_conf: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", tmp_path / "s", "filecap", 1)
    p = run(["selftest", "--only", "line-hum", "line-humm", "--config", str(cfg)], asound_conf)
    assert p.returncode == 2
    err = p.stderr.strip()
    assert "\n" not in err and "unknown check 'line-humm'" in err
    assert "accepted: capture-device, line-signal" in err and "memory" in err
    assert not (tmp_path / "s" / "selftest" / "last.json").exists()
    p = run(["selftest", "--continue", "--config", str(cfg)], asound_conf)
    assert p.returncode == 2 and "no self-test session is waiting" in p.stderr
    p = run(["selftest", "--junit", str(tmp_path / "no" / "x.xml"), "--config", str(cfg)], asound_conf)
    assert p.returncode == 2 and "--junit" in p.stderr and p.stderr.count("\n") == 1


def test_pass_exits_0_and_junit_lists_every_result(tmp_path: Path, asound_conf: Path) -> None:
    raw = write_s16(tmp_path / "ok.raw", [noise(SECONDS, -80.0, 1), noise(SECONDS, -78.0, 2)])
    cfg = write_config(tmp_path / "c.toml", tmp_path / "s", f"filecap:FILE={raw}", 2)
    junit = tmp_path / "out.xml"
    p = run(["selftest", "--only", "capture-device", "line-signal", "line-hum", "line-call-level",
             "--junit", str(junit), "--config", str(cfg)], asound_conf)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "selftest: PASS" in p.stdout and "PASS  line-hum[L2]" in p.stdout
    suite = ET.parse(junit).getroot()
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names == ["capture-device[main]", "line-signal[L1]", "line-signal[L2]", "line-hum[L1]",
                     "line-hum[L2]", "line-call-level[L1]", "line-call-level[L2]"]
    assert suite.get("failures") == "0" and suite.get("skipped") == "2"


def dominant(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec[1:]) + 1) * rate / len(x)


def test_loopback_session_resumes_across_processes(tmp_path: Path, asound_conf: Path) -> None:
    """Two plug steps (L2, then L3); each step is a new process, as after a reboot."""
    raw = tmp_path / "in.raw"
    played = tmp_path / "played.raw"
    extra = f'playback_device = "play:FILE={played}"\nloopback_lines = ["L2", "L3"]'
    cfg = write_config(tmp_path / "c.toml", tmp_path / "s", f"filecap:FILE={raw}", 4, extra)
    quiet = [noise(SECONDS, -80.0, i) for i in range(4)]
    write_s16(raw, quiet)
    session = tmp_path / "s" / "selftest" / "session.json"

    p1 = run(["selftest", "--only", "line-signal", "loopback", "--config", str(cfg)], asound_conf)
    assert p1.returncode == 1, p1.stdout + p1.stderr
    assert "WAITING: plug the test plug into line L2 (step 1 of 2)" in p1.stdout
    assert "--continue" in p1.stdout
    saved = json.loads(session.read_text())
    assert saved["next_step"] == 0 and saved["steps"] == ["L2", "L3"]
    assert len(saved["results"]) == 4  # line-signal for 4 lines, kept across the restart

    # The plug is in line 2: the 1004 Hz tone comes back on input 2 (at -20 dBFS).
    tone = sine(SECONDS, 1004.0, -20.0)
    write_s16(raw, [quiet[0], tone + quiet[1], quiet[2], quiet[3]])
    p2 = run(["selftest", "--continue", "--config", str(cfg)], asound_conf)
    assert p2.returncode == 1, p2.stdout + p2.stderr
    assert "PASS  loopback[L2]" in p2.stdout
    assert "WAITING: plug the test plug into line L3 (step 2 of 2)" in p2.stdout
    # What was played into the plug: the 1004 Hz telephone test tone, at -10 dBm0 = -16.15 dBFS.
    out = np.frombuffer(played.read_bytes(), dtype="<i2")
    assert out.size > RATE
    x = out[: 48000].astype(np.float64) / 32768.0
    assert abs(dominant(x, 48000) - 1004.0) < 2.0
    assert abs(20 * np.log10(np.sqrt(np.mean(x**2))) - -16.15) < 0.3

    # The technician plugs line 3, but the tone arrives on line 4 (swapped wiring).
    write_s16(raw, [quiet[0], quiet[1], quiet[2], tone + quiet[3]])
    p3 = run(["selftest", "--continue", "--json", "--config", str(cfg)], asound_conf)
    assert p3.returncode == 1
    doc = json.loads(p3.stdout)
    assert doc["complete"] is True and doc["verdict"] == "FAIL"
    loop = {r["subject"]: r for r in doc["results"] if r["check"] == "loopback"}
    assert loop["L2"]["verdict"] == "PASS" and abs(loop["L2"]["value"] - 1004.0) < 5.0
    assert loop["L3"]["verdict"] == "FAIL"
    assert loop["L3"]["hint"].startswith("the test tone arrived on line L4, not on L3")
    assert [r["check"] for r in doc["results"]].count("line-signal") == 4
    assert not session.exists()
    assert json.loads((tmp_path / "s" / "selftest" / "last.json").read_text()) == doc


def test_loopback_without_the_plug_fails(tmp_path: Path, asound_conf: Path) -> None:
    raw = write_s16(tmp_path / "in.raw", [noise(SECONDS, -80.0, i) for i in range(2)])
    extra = f'playback_device = "play:FILE={tmp_path / "p.raw"}"\nloopback_lines = ["L1"]'
    cfg = write_config(tmp_path / "c.toml", tmp_path / "s", f"filecap:FILE={raw}", 2, extra)
    assert run(["selftest", "--only", "loopback", "--config", str(cfg)], asound_conf).returncode == 1
    p = run(["selftest", "--continue", "--json", "--config", str(cfg)], asound_conf)
    r = json.loads(p.stdout)["results"][0]
    assert (r["check"], r["verdict"]) == ("loopback", "FAIL")
    assert r["hint"].startswith("no test tone on line L1: check that the test plug is in line L1")


def test_loopback_with_a_weak_return_warns(tmp_path: Path, asound_conf: Path) -> None:
    """Played at -16 dBFS, back at -50 dBFS: 34 dB lost, below the -40 dBFS the check expects."""
    raw = write_s16(tmp_path / "in.raw", [sine(SECONDS, 1004.0, -50.0) + noise(SECONDS, -90.0, 1),
                                          noise(SECONDS, -80.0, 2)])
    extra = f'playback_device = "play:FILE={tmp_path / "p.raw"}"\nloopback_lines = ["L1"]'
    cfg = write_config(tmp_path / "c.toml", tmp_path / "s", f"filecap:FILE={raw}", 2, extra)
    assert run(["selftest", "--only", "loopback", "--config", str(cfg)], asound_conf).returncode == 1
    p = run(["selftest", "--continue", "--json", "--config", str(cfg)], asound_conf)
    assert p.returncode == 0, p.stdout
    r = json.loads(p.stdout)["results"][0]
    assert r["verdict"] == "WARN" and r["hint"].startswith("the test tone returns weak on line L1")
