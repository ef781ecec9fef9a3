"""Each audio check against a file-backed ALSA PCM built to fail in one known way.

Expected verdicts come from the limits the checks are specified by (ITU-T G.711/G.712/P.56 and
the stated engineering values in hw-tests/CHECKS.md), applied to signals whose levels are set
here, far enough from every limit that the verdict is not a matter of rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import load_config
from appliance.selftest import CheckResult, Verdict, run_selftest
from tests.selftest.conftest import (
    DBM0_DBFS,
    noise,
    sine,
    speech_like,
    write_config,
    write_s16,
)

SECONDS = 3.0
LINE_CHECKS = ["capture-device", "line-signal", "line-noise", "line-hum", "line-dc",
               "line-clipping", "line-call-level"]

# Limits from the specification, in dBFS (0 dBm0 = -6.15 dBFS, see conftest).
G712_IDLE_NOISE_DBFS = -65 + DBM0_DBFS       # PASS at or below
HUM_FAIL_DBFS = -45 + DBM0_DBFS              # FAIL above
ONE_LSB_DBFS = 20 * np.log10(1 / 32768)      # -90.3 dBFS: below this a line is digital silence


def by(results: tuple[CheckResult, ...], check: str, subject: str) -> CheckResult:
    found = [r for r in results if r.check == check and r.subject == subject]
    assert len(found) == 1, f"{check}[{subject}]: {found}"
    return found[0]


@pytest.fixture(scope="module")
def lines_result(tmp_path_factory: pytest.TempPathFactory, asound_conf: Path) -> tuple[CheckResult, ...]:
    tmp = tmp_path_factory.mktemp("lines")
    quiet = -80.0  # idle line noise, well inside G.712's -71 dBFS
    raw = write_s16(tmp / "lines.raw", [
        noise(SECONDS, quiet, 1),                                        # L1 a good idle line
        np.zeros(int(8000 * SECONDS)),                                   # L2 silent (not wired)
        np.clip(2.0 * np.sin(2 * np.pi * 440 * np.arange(int(8000 * SECONDS)) / 8000), -1, 1),  # L3
        sine(SECONDS, 50.0, -25.0) + noise(SECONDS, quiet, 4),           # L4 50 Hz hum
        0.10 + noise(SECONDS, quiet, 5),                                 # L5 DC offset 10 % FS
        speech_like(SECONDS, -26.0, 6),                                  # L6 a call at -20 dBm0
        sine(SECONDS, 60.0, -62.0) + noise(SECONDS, quiet, 7),           # L7 60 Hz, mild
    ])
    cfg = load_config(write_config(tmp / "cfg.toml", tmp / "state", f"filecap:FILE={raw}", 7))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALSA_CONFIG_PATH", str(asound_conf))
        return run_selftest(cfg, only=LINE_CHECKS).results


def test_device_matches_config(lines_result: tuple[CheckResult, ...]) -> None:
    r = by(lines_result, "capture-device", "main")
    assert r.verdict is Verdict.PASS and r.value == "7 ch"


def test_a_good_idle_line_passes_everything_and_skips_the_call_level(
        lines_result: tuple[CheckResult, ...]) -> None:
    for check in ("line-signal", "line-noise", "line-hum", "line-dc", "line-clipping"):
        r = by(lines_result, check, "L1")
        assert r.verdict is Verdict.PASS, r
        assert r.hint == ""
    floor = by(lines_result, "line-noise", "L1").value
    assert isinstance(floor, float) and floor <= G712_IDLE_NOISE_DBFS
    r = by(lines_result, "line-call-level", "L1")
    assert r.verdict is Verdict.SKIP and "place a test call on it" in r.hint


def test_a_silent_line_fails_signal_present(lines_result: tuple[CheckResult, ...]) -> None:
    r = by(lines_result, "line-signal", "L2")
    assert r.verdict is Verdict.FAIL
    assert isinstance(r.value, float) and r.value < ONE_LSB_DBFS
    assert "no signal on line L2 (input 2 of main)" in r.hint and "wiring" in r.hint
    assert by(lines_result, "line-signal", "L3").verdict is Verdict.PASS


def test_a_clipped_line_fails_clipping(lines_result: tuple[CheckResult, ...]) -> None:
    r = by(lines_result, "line-clipping", "L3")
    assert r.verdict is Verdict.FAIL
    assert "line L3 (input 3 of main) clips" in r.hint and "lower the input gain" in r.hint
    # A sine driven to twice full scale sits at the limit for 2/3 of each period.
    assert isinstance(r.value, float) and 60 < r.value < 70
    assert all(by(lines_result, "line-clipping", ln).verdict is Verdict.PASS
               for ln in ("L1", "L4", "L5", "L6"))


def test_50hz_hum_fails_and_names_the_frequency(lines_result: tuple[CheckResult, ...]) -> None:
    r = by(lines_result, "line-hum", "L4")
    assert r.verdict is Verdict.FAIL
    assert isinstance(r.value, float) and abs(r.value - -25.0) < 0.5 and r.value > HUM_FAIL_DBFS
    assert r.hint.startswith("50 Hz mains hum on line L4") and "ground loop" in r.hint
    assert by(lines_result, "line-hum", "L1").verdict is Verdict.PASS


def test_mild_60hz_hum_warns(lines_result: tuple[CheckResult, ...]) -> None:
    """-62 dBFS is above G.712's idle-noise limit (-71 dBFS) and below the FAIL limit (-51)."""
    r = by(lines_result, "line-hum", "L7")
    assert r.verdict is Verdict.WARN and r.hint.startswith("60 Hz mains hum on line L7")
    assert isinstance(r.value, float) and abs(r.value - -62.0) < 0.5


def test_dc_offset_fails(lines_result: tuple[CheckResult, ...]) -> None:
    r = by(lines_result, "line-dc", "L5")
    assert r.verdict is Verdict.FAIL and r.value == pytest.approx(10.0, abs=0.05)
    assert "DC offset on line L5" in r.hint and "isolated tap" in r.hint
    assert by(lines_result, "line-dc", "L1").verdict is Verdict.PASS


def test_call_level_is_the_active_speech_level(lines_result: tuple[CheckResult, ...]) -> None:
    """Speech bursts at -26 dBFS (-20 dBm0, the nominal telephone talker level) pass."""
    r = by(lines_result, "line-call-level", "L6")
    assert r.verdict is Verdict.PASS and r.hint == ""
    assert isinstance(r.value, float) and abs(r.value - -26.0) < 1.0


def test_noisy_line_fails_noise_floor(tmp_path: Path) -> None:
    """Broadband noise at -40 dBFS: above -30 dBm0 - 12 dB (threshold_db) = -48 dBFS."""
    raw = write_s16(tmp_path / "n.raw", [noise(SECONDS, -80.0, 1), noise(SECONDS, -40.0, 2)])
    cfg = load_config(write_config(tmp_path / "c.toml", tmp_path / "s", f"filecap:FILE={raw}", 2))
    res = run_selftest(cfg, only=["line-noise"]).results
    assert by(res, "line-noise", "L1").verdict is Verdict.PASS
    r = by(res, "line-noise", "L2")
    assert r.verdict is Verdict.FAIL and "quiet calls will be missed" in r.hint
    assert isinstance(r.value, float) and abs(r.value - -40.0) < 1.5


def test_missing_device_fails_with_a_hint_and_no_line_is_checked(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.toml", tmp_path / "s", "hw:CARD=Absent,DEV=0", 4))
    res = run_selftest(cfg, only=LINE_CHECKS).results
    dev = by(res, "capture-device", "main")
    assert dev.verdict is Verdict.FAIL and dev.value == "missing"
    assert "capture device 'hw:CARD=Absent,DEV=0' not found" in dev.hint
    for check in LINE_CHECKS[1:]:
        r = by(res, check, "main")
        assert r.verdict is Verdict.FAIL and "fix capture-device first" in r.hint


def test_fewer_channels_than_configured(tmp_path: Path) -> None:
    raw = write_s16(tmp_path / "two.raw", [noise(SECONDS, -80.0, 1), noise(SECONDS, -80.0, 2)])
    cfg = load_config(write_config(tmp_path / "c.toml", tmp_path / "s", f"two:FILE={raw}", 4))
    res = run_selftest(cfg, only=["capture-device", "line-signal"]).results
    dev = by(res, "capture-device", "main")
    assert dev.verdict is Verdict.FAIL and dev.value == "2 ch"
    assert "offers 2 channel(s)" in dev.hint and "capture.channels" in dev.hint
    assert "capture.channels = 4" in dev.detail
    assert by(res, "line-signal", "main").verdict is Verdict.FAIL
    # The same device configured for its 2 channels passes.
    cfg2 = load_config(write_config(tmp_path / "c2.toml", tmp_path / "s", f"two:FILE={raw}", 2))
    assert by(run_selftest(cfg2, only=["capture-device"]).results, "capture-device",
              "main").verdict is Verdict.PASS


def test_catalogue_documents_every_check() -> None:
    from appliance.selftest import check_names

    text = (Path(__file__).parents[2] / "hw-tests" / "CHECKS.md").read_text()
    for name in check_names():
        assert f"| `{name}` |" in text, f"hw-tests/CHECKS.md does not document {name}"
