"""ALSA capture through the real libasound: every format, channel count and rate we accept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.audio.alsa import AlsaSource, DeviceCaps, choose
from appliance.audio.source import DeviceFormatError, DeviceLost, open_source
from appliance.config import CaptureSection
from tests.capture.conftest import dominant_frequency, sine_frames, tone_frequencies, write_raw

FORMATS = ["S16_LE", "S24_3LE", "S24_LE", "S32_LE", "FLOAT_LE"]
STORAGE = 8000


def capture(source: AlsaSource, frames: int) -> np.ndarray:
    source.open(0)
    got: list[np.ndarray] = []
    pos = 0
    try:
        while pos < frames:
            blk = source.read()
            assert blk.frame_pos == pos, "blocks must be contiguous"
            assert blk.lost_frames == 0
            got.append(blk.pcm)
            pos += blk.frames
    finally:
        source.close()
    return np.concatenate(got)[:frames]


def check_tones(pcm: np.ndarray, freqs: list[float], amplitude: float = 0.5) -> None:
    window = pcm[800:7200].astype(np.float64)  # skip the resampler's start
    for ch, f in enumerate(freqs):
        x = window[:, ch]
        got = dominant_frequency(x, STORAGE)
        assert abs(got - f) < 2.0, f"channel {ch + 1}: tone at {got:.1f} Hz, expected {f}"
        rms_db = 20 * np.log10(np.sqrt(np.mean(x**2)) / 32768)
        want_db = 20 * np.log10(amplitude / np.sqrt(2))
        assert abs(rms_db - want_db) < 0.5, f"channel {ch + 1}: level {rms_db:.2f} dBFS"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rate", [8000, 44100, 48000])
@pytest.mark.parametrize("channels", [2, 8, 16])
def test_each_line_carries_its_tone(tmp_path: Path, fmt: str, rate: int, channels: int) -> None:
    raw = write_raw(tmp_path / "in.raw", sine_frames(channels, rate, 1.3), fmt)
    src = AlsaSource(f"filecap:FILE={raw}", storage_rate=STORAGE, channels=channels, rate=rate,
                     sample_format=fmt)
    pcm = capture(src, STORAGE)
    assert src.choice is not None
    assert (src.choice.fmt, src.choice.rate, src.choice.device_channels) == (fmt, rate, channels)
    assert pcm.dtype == np.int16 and pcm.shape == (STORAGE, channels)
    check_tones(pcm, tone_frequencies(channels))


def test_auto_format_and_rate_pick_cheapest_path(tmp_path: Path) -> None:
    """'auto' on a device that takes anything: S16_LE at the storage rate (no resampling)."""
    raw = write_raw(tmp_path / "in.raw", sine_frames(2, STORAGE, 1.2), "S16_LE")
    src = AlsaSource(f"filecap:FILE={raw}", storage_rate=STORAGE, channels=2)
    pcm = capture(src, STORAGE)
    assert src.choice is not None and (src.choice.fmt, src.choice.rate) == ("S16_LE", STORAGE)
    check_tones(pcm, tone_frequencies(2))


def test_channel_map_names_lines_by_device_channel(tmp_path: Path) -> None:
    """Lines are stored in device-channel order; the map says which line each channel is, so
    a map listing channels out of order still puts each line's audio under its id."""
    raw = write_raw(tmp_path / "in.raw", sine_frames(4, 48000, 1.2), "S32_LE")
    section = CaptureSection.model_validate({
        "device": f"filecap:FILE={raw}", "channels": 4, "rate": 48000,
        "sample_format": "S32_LE",
        "lines": [{"channel": 3, "line": "sales"}, {"channel": 1, "line": "support"}],
    })
    pcm = capture(open_source(section), STORAGE)  # type: ignore[arg-type]
    ids = section.line_ids(pcm.shape[1], single_stream=True)
    assert ids == ["support", "L2", "sales", "L4"]
    freqs = tone_frequencies(4)
    window = pcm[800:7200]
    assert abs(dominant_frequency(window[:, ids.index("sales")], STORAGE) - freqs[2]) < 2
    assert abs(dominant_frequency(window[:, ids.index("support")], STORAGE) - freqs[0]) < 2


def test_device_with_fixed_channel_count_is_opened_wide_and_the_first_kept() -> None:
    """Hardware often opens only with all its channels: open 8, keep the configured 4."""
    caps = DeviceCaps("hw:CARD=X,DEV=0", ("S32_LE",), (8,), (48000,), False)
    choice = choose(caps, fmt="auto", channels=4, rate=0, storage_rate=STORAGE)
    assert (choice.fmt, choice.device_channels, choice.channels, choice.rate) == (
        "S32_LE", 8, 4, 48000)
    with pytest.raises(DeviceFormatError, match="at most 8"):
        choose(caps, fmt="auto", channels=10, rate=0, storage_rate=STORAGE)
    with pytest.raises(DeviceFormatError, match="refuses it; it supports 48000 Hz"):
        choose(caps, fmt="auto", channels=4, rate=44100, storage_rate=STORAGE)


def test_line_mapped_beyond_captured_channels_is_a_config_error() -> None:
    section = CaptureSection.model_validate({
        "device": "filecap", "channels": 2, "lines": [{"channel": 5, "line": "x"}],
    })
    with pytest.raises(Exception, match=r"capture.lines: line 'x' is on channel 5.*1\.\.2"):
        open_source(section)


def test_device_refusing_the_format_names_what_it_supports() -> None:
    src = AlsaSource("alawonly", storage_rate=STORAGE, channels=2, rate=8000,
                     sample_format="S16_LE")
    with pytest.raises(DeviceFormatError) as err:
        src.open(0)
    msg = str(err.value)
    assert "'S16_LE'" in msg and "alawonly" in msg and "A_LAW" in msg and "\n" not in msg


def test_auto_channels_on_a_converting_plugin_asks_for_a_count() -> None:
    src = AlsaSource("filecap", storage_rate=STORAGE)
    with pytest.raises(Exception, match="set capture.channels"):
        src.open(0)


def test_missing_device_is_device_lost_naming_it() -> None:
    src = AlsaSource("hw:CARD=NoSuchCard,DEV=0", storage_rate=STORAGE, channels=2)
    with pytest.raises(DeviceLost, match="hw:CARD=NoSuchCard,DEV=0"):
        src.open(0)
