"""Bad input on the command line gives one line naming the problem and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def appliance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert_one_line_error(appliance("run", "--config", str(missing)), str(missing), "does not exist")


def test_malformed_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[recorder\nstop_delay_s = 4\n")
    assert_one_line_error(appliance("run", "--config", str(cfg)), str(cfg), "not valid TOML")


def test_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[recorder]\nstop_dealy_s = 4\n")
    assert_one_line_error(appliance("run", "--config", str(cfg)), "unknown key", "stop_dealy_s",
                          f"{cfg}:2")


@pytest.mark.parametrize(
    ("text", "key", "accepted"),
    [
        ("[recorder]\nstop_delay_s = 100\n", "recorder.stop_delay_s", "less than or equal to 60"),
        ("[ring]\nsync_interval_ms = 1\n", "ring.sync_interval_ms", "greater than or equal to 10"),
        ("[[capture]]\nstorage_rate = 11025\n", "capture.0.storage_rate", "8000"),
        ("[seal]\ncodec = \"mp3\"\n", "seal.codec", "'flac'"),
        ("[seal]\nopus_complexity = 11\n", "seal.opus_complexity", "less than or equal to 10"),
        ("[device]\nid = \"has space\"\n", "device.id", "pattern"),
    ],
)
def test_value_out_of_range(tmp_path: Path, text: str, key: str, accepted: str) -> None:
    cfg = tmp_path / "range.toml"
    cfg.write_text(text)
    assert_one_line_error(appliance("run", "--config", str(cfg)), key, accepted)


def test_bad_arguments() -> None:
    assert_one_line_error(appliance("demo", "--seconds", "-3"), "--seconds", "greater than 0")
    assert_one_line_error(appliance("demo", "--lines", "many"), "--lines", "whole number")
    assert_one_line_error(appliance("frobnicate"), "invalid choice")


def test_demo_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_one_line_error(appliance("demo", "--dir", str(blocker / "sub")), "--dir", "cannot write")


def test_demo_without_mosquitto(tmp_path: Path) -> None:
    env = dict(os.environ, APPLIANCE_MOSQUITTO=str(tmp_path / "no-such-mosquitto"))
    result = appliance("demo", "--dir", str(tmp_path / "demo"), "--seconds", "5", env=env)
    assert_one_line_error(result, "mosquitto not found", "apt-get install mosquitto")
