"""Capture tests run through the real libasound with file-backed PCMs.

``ALSA_CONFIG_PATH`` points at a test-local configuration that replaces the system one
entirely (so neither ~/.asoundrc nor sound hardware matter):

- ``filecap:FILE=<raw file>``: a capture PCM that plays back a raw interleaved file (the
  ``file`` plugin's ``infile`` over a ``null`` slave); it accepts any format, channel count
  and rate, so each test writes the file in the layout it opens with;
- ``alawonly``: a PCM that only accepts A_LAW (the ``alaw`` plugin), to see a refusal;
- ``pacap`` and ``default``: fixed-file PCMs for PortAudio, which lists only configured
  names (and, in 19.6, aborts in BuildDeviceList unless 'default' is among them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.audio.convert import encode

ASOUND_CONF = """
pcm.filecap {{
  @args [ FILE ]
  @args.FILE {{ type string default "/dev/zero" }}
  type file
  slave.pcm {{ type null }}
  file "/dev/null"
  infile $FILE
  format "raw"
  hint {{ show on description "file-backed test capture" }}
}}
pcm.alawonly {{
  type alaw
  slave {{ pcm {{ type null }} format S16_LE }}
  hint {{ show on description "accepts only A_LAW" }}
}}
pcm.pacap {{
  type file
  slave.pcm {{ type null }}
  file "/dev/null"
  infile "{pa_file}"
  format "raw"
}}
pcm.default {{
  type file
  slave.pcm {{ type null }}
  file "/dev/null"
  infile "/dev/zero"
  format "raw"
}}
"""


@pytest.fixture(scope="session")
def alsa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("alsa")
    (folder / "asound.conf").write_text(ASOUND_CONF.format(pa_file=folder / "pacap.raw"))
    (folder / "pacap.raw").write_bytes(b"")
    return folder


@pytest.fixture(autouse=True)
def alsa_config(alsa_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # libasound re-reads its configuration when ALSA_CONFIG_PATH changes.
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(alsa_dir / "asound.conf"))
    monkeypatch.delenv("ALSA_CONFIG_DIR", raising=False)
    yield alsa_dir / "asound.conf"


def tone_frequencies(channels: int) -> list[float]:
    """A distinct tone per channel, all below the 4 kHz storage Nyquist: 250, 450, ... Hz."""
    return [250.0 + 200.0 * i for i in range(channels)]


def sine_frames(channels: int, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    freqs = tone_frequencies(channels)
    return np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs], axis=1)


def write_raw(path: Path, frames: np.ndarray, fmt: str) -> Path:
    path.write_bytes(encode(frames.astype(np.float32), fmt))
    return path


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    """Frequency of the strongest FFT bin (Hann window), interpolated between bins."""
    x = x.astype(np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec[1:])) + 1
    if 0 < k < len(spec) - 1:
        a, b, c = np.log(spec[k - 1] + 1e-12), np.log(spec[k] + 1e-12), np.log(spec[k + 1] + 1e-12)
        k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return float(k * rate / len(x))
