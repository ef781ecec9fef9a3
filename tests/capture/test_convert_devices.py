"""Sample-format conversion (property tests), ``appliance devices``/``sample``, PortAudio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audio.convert import Converter, decode_float, encode, to_int16
from appliance.audio.devices import devices_command, sample_command
from appliance.audio.source import DeviceFormatError
from tests.capture.conftest import dominant_frequency, sine_frames, tone_frequencies, write_raw

FORMATS = ["S16_LE", "S24_3LE", "S24_LE", "S32_LE", "FLOAT_LE"]
STEP = {"S16_LE": 2**-15, "S24_3LE": 2**-23, "S24_LE": 2**-23, "S32_LE": 2**-31,
        "FLOAT_LE": 1e-7}

samples = st.lists(st.floats(-1.0, 0.99951171875, allow_nan=False, width=32), min_size=1, max_size=64)


@settings(max_examples=60, deadline=None)
@given(values=samples, fmt=st.sampled_from(FORMATS), channels=st.sampled_from([1, 2, 3]))
def test_decode_inverts_encode(values: list[float], fmt: str, channels: int) -> None:
    n = len(values) - len(values) % channels or channels
    x = np.resize(np.array(values, dtype=np.float32), n).reshape(-1, channels)
    y = decode_float(encode(x, fmt), fmt, channels)
    assert y.shape == x.shape
    assert np.max(np.abs(y - x)) <= STEP[fmt] * 0.5 + 1e-7


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-(2**23), 2**23 - 1), min_size=1, max_size=32),
       junk=st.integers(0, 255))
def test_s24_le_ignores_the_top_byte(values: list[int], junk: int) -> None:
    words = np.array(values, dtype="<i4")
    dirty = (words.view(np.uint32) & 0x00FFFFFF) | np.uint32(junk << 24)
    y = decode_float(dirty.astype("<u4").tobytes(), "S24_LE", 1)
    assert np.array_equal(y[:, 0], words.astype(np.float32) / 2**23)


def test_int16_rounding_and_clipping() -> None:
    x = np.array([[1.5], [-1.5], [0.25 / 32768], [0.75 / 32768], [-1.0]], dtype=np.float32)
    assert to_int16(x)[:, 0].tolist() == [32767, -32768, 0, 1, -32768]


def test_converter_selects_channels_in_stored_order() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 100
    conv = Converter(fmt="FLOAT_LE", device_channels=3, select=[2, 0], in_rate=8000,
                     out_rate=8000)
    assert np.array_equal(conv.push(encode(x, "FLOAT_LE")), to_int16(x[:, [2, 0]]))
    with pytest.raises(Exception, match=r"channel 4 does not exist .*1\.\.3"):
        Converter(fmt="S16_LE", device_channels=3, select=[3], in_rate=8000, out_rate=8000)
    with pytest.raises(Exception, match="accepted: S16_LE, S24_3LE"):
        Converter(fmt="S8", device_channels=3, select=[0], in_rate=8000, out_rate=8000)


def test_devices_lists_configured_pcms_with_probed_parameters(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert devices_command(as_json=True) == 0
    rows = {r["device"]: r for r in json.loads(capsys.readouterr().out) if r["api"] == "alsa"}
    assert rows["filecap"]["capture_formats"] == FORMATS
    assert rows["filecap"]["channels"] == "any"
    assert rows["alawonly"]["formats"] == ["A_LAW"] and rows["alawonly"]["capture_formats"] == []
    assert devices_command(as_json=False) == 0
    table = capsys.readouterr().out
    assert "filecap" in table and "none usable (A_LAW)" in table


def test_sample_records_a_wav_through_the_capture_path(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_raw(tmp_path / "in.raw", sine_frames(8, 48000, 1.5), "S32_LE")
    out = tmp_path / "take.wav"
    code = sample_command(device=f"filecap:FILE={raw}", channels=8, rate=48000, seconds=1.0,
                          out=out, sample_format="S32_LE")
    assert code == 0
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == 8000 and data.shape == (8000, 8)
    for ch, f in enumerate(tone_frequencies(8)):
        assert abs(dominant_frequency(data[800:7200, ch], 8000) - f) < 2
    assert "8 ch, 8000 Hz, 1.00 s" in capsys.readouterr().out


def test_sample_on_a_device_refusing_the_format_is_one_line() -> None:
    with pytest.raises(DeviceFormatError) as err:
        sample_command(device="alawonly", channels=2, rate=8000, seconds=0.5,
                       out=Path("/nonexistent/x.wav"))
    assert "it supports A_LAW" in str(err.value) and "\n" not in str(err.value)


def test_portaudio_source_over_alsa(alsa_dir: Path) -> None:
    """PortAudio's ALSA host API reads the same kind of file-backed PCM ('pacap')."""
    sd = pytest.importorskip("sounddevice")
    from appliance.audio.portaudio import PortAudioSource

    write_raw(alsa_dir / "pacap.raw", sine_frames(2, 48000, 2.0), "S16_LE")
    # PortAudio lists devices once, at initialisation: re-initialise under the test config.
    sd._terminate()
    sd._initialize()
    try:
        src = PortAudioSource("pacap", storage_rate=8000, channels=2, rate=48000,
                              sample_format="S16_LE")
        src.open(0)
        got, pos = [], 0
        try:
            while pos < 8000:
                blk = src.read()
                assert blk.frame_pos == pos + blk.lost_frames
                got.append(blk.pcm)
                pos = blk.frame_pos + blk.frames
        finally:
            src.close()
    finally:
        sd._terminate()
        sd._initialize()
    pcm = np.concatenate(got)
    for ch, f in enumerate(tone_frequencies(2)):
        assert abs(dominant_frequency(pcm[800:7200, ch], 8000) - f) < 2
