from __future__ import annotations

import numpy as np
import pytest

from linerec_contract.codec import CODECS, decode_audio, encode_audio
from linerec_contract.errors import FormatError

from .helpers import speechish


@pytest.mark.parametrize("codec", ["flac", "zstd-pcm"])
@pytest.mark.parametrize("rate", [8000, 11025, 48000])
def test_lossless_round_trip(codec: str, rate: int) -> None:
    pcm = speechish(0.3, rate)
    pcm[:3] = [-32768, 32767, 0]
    out, out_rate = decode_audio(encode_audio(pcm, rate, codec), codec)
    assert out_rate == rate and out.dtype == np.int16
    np.testing.assert_array_equal(out, pcm)


def test_opus_round_trip_and_bitrate() -> None:
    pcm = speechish(4.0)
    small = encode_audio(pcm, 8000, "opus", opus_bitrate=8000)
    big = encode_audio(pcm, 8000, "opus", opus_bitrate=32000)
    assert len(small) < len(big)
    assert len(small) * 8 / 4.0 < 8000 * 1.5  # near the target bitrate (plus Ogg overhead)
    out, rate = decode_audio(small, "opus")
    assert rate == 8000 and abs(out.size - pcm.size) <= 960


@pytest.mark.parametrize(
    ("pcm", "rate", "codec", "match"),
    [
        (np.zeros(10, np.float32), 8000, "flac", "int16"),
        (np.zeros((10, 2), np.int16), 8000, "flac", "1-D"),
        (np.zeros(0, np.int16), 8000, "flac", "at least one frame"),
        (np.zeros(10, np.int16), 0, "flac", "sample rate"),
        (np.zeros(10, np.int16), 44100, "opus", "opus"),
        (np.zeros(10, np.int16), 8000, "mp3", "accepted: flac, opus, zstd-pcm"),
    ],
)
def test_bad_input_names_what_is_accepted(pcm: np.ndarray, rate: int, codec: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        encode_audio(pcm, rate, codec)


def test_opus_bitrate_range() -> None:
    with pytest.raises(FormatError, match="6000..256000"):
        encode_audio(speechish(0.1), 8000, "opus", opus_bitrate=1000)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("data", [b"", b"garbage" * 20])
def test_garbage_does_not_decode(codec: str, data: bytes) -> None:
    with pytest.raises(FormatError):
        decode_audio(data, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_truncated_does_not_decode_silently(codec: str) -> None:
    data = encode_audio(speechish(0.5), 8000, codec)
    with pytest.raises(FormatError):
        decode_audio(data[: len(data) // 4], codec)
