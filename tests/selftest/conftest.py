"""Self-test tests run the real libasound with file-backed PCMs (``ALSA_CONFIG_PATH``):

- ``filecap:FILE=<raw>``: capture from a raw interleaved file, any channel count;
- ``two:FILE=<raw>``: the same behind the ``multi`` plugin, which fixes the channel count at 2
  (an interface with fewer inputs than the config expects);
- ``play:FILE=<raw>``: playback into a raw file (what the test plug would be fed);
- ``default``: PortAudio 19.6 aborts while listing devices unless 'default' exists.

A phone line and a test plug cannot exist here: the capture files hold what a line (or the plug
wired back into a line) would deliver, generated with numpy independently of the code under test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ASOUND_CONF = """
pcm.filecap {
  @args [ FILE ]
  @args.FILE { type string default "/dev/zero" }
  type file
  slave.pcm { type null }
  file "/dev/null"
  infile $FILE
  format "raw"
}
pcm.two {
  @args [ FILE ]
  @args.FILE { type string default "/dev/zero" }
  type multi
  slaves.a { pcm { type file slave.pcm { type null } file "/dev/null" infile $FILE format "raw" }
             channels 2 }
  bindings.0 { slave a channel 0 }
  bindings.1 { slave a channel 1 }
}
pcm.default {
  type file
  slave.pcm { type null }
  file "/dev/null"
  infile "/dev/zero"
  format "raw"
}
pcm.play {
  @args [ FILE ]
  @args.FILE { type string default "/dev/null" }
  type file
  slave.pcm { type null }
  file $FILE
  format "raw"
}
"""

RATE = 8000
DBM0_DBFS = -3.01 - 3.14
"""ITU-T G.711: the digital milliwatt (0 dBm0) peaks 3.14 dB below overload; RMS dBFS here
puts a full-scale sine at -3.01 dBFS."""


@pytest.fixture(scope="session")
def asound_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("alsa") / "asound.conf"
    path.write_text(ASOUND_CONF)
    return path


@pytest.fixture(autouse=True)
def alsa_config(asound_conf: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(asound_conf))
    monkeypatch.delenv("ALSA_CONFIG_DIR", raising=False)
    yield asound_conf


def rms_amplitude(dbfs: float) -> float:
    """Peak amplitude (full scale 1.0) of a sine whose RMS level is ``dbfs``."""
    return float(np.sqrt(2.0) * 10 ** (dbfs / 20.0))


def noise(seconds: float, dbfs: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(int(RATE * seconds)) * 10 ** (dbfs / 20.0)


def sine(seconds: float, hz: float, dbfs: float) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return rms_amplitude(dbfs) * np.sin(2 * np.pi * hz * t)


def speech_like(seconds: float, active_dbfs: float, seed: int) -> np.ndarray:
    """Bursts of voice-band noise (300-3400 Hz) 0.4 s on, 0.2 s off, at ``active_dbfs`` while on."""
    rng = np.random.default_rng(seed)
    n = int(RATE * seconds)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec[(f < 300) | (f > 3400)] = 0
    x = np.fft.irfft(spec, n)
    on = (np.arange(n) % int(0.6 * RATE)) < int(0.4 * RATE)
    x = x / np.sqrt(np.mean(x[on] ** 2)) * 10 ** (active_dbfs / 20.0)
    return x * on + noise(seconds, -85.0, seed + 1)


def write_s16(path: Path, channels: list[np.ndarray]) -> Path:
    """Interleaved S16_LE; each channel float with full scale 1.0 (clipped like a converter)."""
    x = np.stack(channels, axis=1)
    path.write_bytes(np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes())
    return path


def write_config(path: Path, state: Path, device: str, channels: int, extra: str = "") -> Path:
    path.write_text(f"""
[paths]
state_dir = "{state}"
[[capture]]
device = "{device}"
channels = {channels}
rate = {RATE}
sample_format = "S16_LE"
[uplink]
transport = "none"
[selftest]
capture_s = 2.0
{extra}
""")
    return path


def cli_env(asound_conf: Path) -> dict[str, str]:
    env = dict(os.environ, ALSA_CONFIG_PATH=str(asound_conf))
    return env
