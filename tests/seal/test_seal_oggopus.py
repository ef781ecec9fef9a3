"""Ogg Opus written through libopus directly (linerec_contract.oggopus), checked with the stock
tools central IT uses (real ``opusinfo`` and ``opusdec``) and against libsndfile's writer."""

from __future__ import annotations

import io
import logging
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from linerec_contract import oggopus
from linerec_contract.codec import decode_audio, encode_audio
from linerec_contract.errors import FormatError

from .helpers import speechish

pytestmark = pytest.mark.skipif(
    shutil.which("opusinfo") is None or shutil.which("opusdec") is None or not oggopus.available(),
    reason="needs opus-tools and libopus0 (scripts/bootstrap.sh installs them)",
)


def crc_by_the_book(data: bytes) -> int:
    """The Ogg checksum bit by bit (RFC 3533: polynomial 0x04C11DB7, MSB first, initial 0)."""
    reg = 0
    for byte in data:
        reg ^= byte << 24
        for _ in range(8):
            reg = ((reg << 1) ^ 0x04C11DB7) if reg & 0x80000000 else (reg << 1)
            reg &= 0xFFFFFFFF
    return reg


def test_page_checksum() -> None:
    rng = np.random.default_rng(5)
    for size in (0, 1, 27, 300, 4099):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert oggopus.ogg_crc(data) == crc_by_the_book(data), size
    # A page written by libsndfile (another Ogg writer) carries the checksum computed here.
    with sf.SoundFile(buf := io.BytesIO(), "w", 8000, 1, format="OGG", subtype="OPUS") as out:
        out.write(speechish(0.5))
    page = buf.getvalue()[: buf.getvalue().index(b"OggS", 4)]
    assert oggopus.ogg_crc(page[:22] + bytes(4) + page[26:]) == int.from_bytes(page[22:26], "little")


@pytest.mark.parametrize("complexity", [0, 5, 10])
def test_stock_tools_accept_and_decode_it(tmp_path: Path, complexity: int) -> None:
    pcm = speechish(3.0)
    path = tmp_path / "seg.opus"
    path.write_bytes(encode_audio(pcm, 8000, "opus", opus_bitrate=16000,
                                  opus_complexity=complexity))
    info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, check=True)
    assert "Playback length: 0m:03.000s" in info.stdout, info.stdout
    assert "Original sample rate: 8000 Hz" in info.stdout
    assert "WARNING" not in (info.stdout + info.stderr).upper()
    wav = tmp_path / "seg.wav"
    subprocess.run(["opusdec", "--quiet", "--rate", "8000", "--no-dither", str(path), str(wav)],
                   capture_output=True, check=True)
    by_opusdec, rate = sf.read(wav, dtype="int16")
    ours, our_rate = decode_audio(path.read_bytes(), "opus")
    assert rate == our_rate == 8000
    # Both decoders give every input frame, no more (pre-skip and end trimming).
    assert by_opusdec.size == ours.size == pcm.size
    # A lossy codec, and opusdec decodes at 48 kHz and resamples: compare what a listener
    # hears, the level of every 20 ms with sound in it (-50 dBFS or more), with the input's.
    env_in = frame_levels_db(pcm)
    sound = env_in > 40.0
    assert sound.sum() > 50
    for decoded in (by_opusdec, ours):
        env_out = frame_levels_db(decoded)
        assert np.corrcoef(env_in[sound], env_out[sound])[0, 1] > 0.99
        # (opusdec's resampler cuts the top of the band, where this test audio has energy)
        assert abs(float(np.mean(env_out[sound] - env_in[sound]))) < 2.0


def frame_levels_db(x: np.ndarray) -> np.ndarray:
    """Level of every 20 ms in dB over one LSB (int16 full scale is 90 dB)."""
    frames = x[: x.size // 160 * 160].astype(float).reshape(-1, 160)
    return np.asarray(10 * np.log10(np.mean(frames**2, axis=1) + 1.0))


@pytest.mark.parametrize("frames", [1, 159, 160, 161, 8007])
def test_exactly_the_input_frames_come_back(frames: int) -> None:
    pcm = speechish(frames / 8000 + 0.01)[:frames]
    out, rate = decode_audio(encode_audio(pcm, 8000, "opus"), "opus")
    assert rate == 8000 and out.size == frames


def snr_db(pcm: np.ndarray, data: bytes) -> float:
    out, _ = decode_audio(data, "opus")
    err = out.astype(float) - pcm
    return float(10 * np.log10(np.sum(pcm.astype(float) ** 2) / np.sum(err**2)))


def test_quality_and_size_match_libsndfile_at_the_same_bitrate() -> None:
    pcm = speechish(10.0, seed=3)
    with sf.SoundFile(buf := io.BytesIO(), "w", 8000, 1, format="OGG",
                      subtype="OPUS", compression_level=1.0 - (16000 - 6000 + 0.5) / 250000) as out:
        out.write(pcm)
    reference = buf.getvalue()
    for complexity in (0, 5, 10):
        data = encode_audio(pcm, 8000, "opus", opus_bitrate=16000, opus_complexity=complexity)
        assert snr_db(pcm, data) >= snr_db(pcm, reference) - 2.0, complexity
        assert 0.8 * len(reference) <= len(data) <= 1.2 * len(reference), complexity


def test_same_audio_gives_the_same_bytes() -> None:
    pcm = speechish(2.0, seed=1)
    assert encode_audio(pcm, 8000, "opus") == encode_audio(pcm.copy(), 8000, "opus")
    assert encode_audio(pcm, 8000, "opus") != encode_audio(pcm, 8000, "opus", opus_complexity=0)


def test_bad_complexity_is_named() -> None:
    with pytest.raises(FormatError, match=r"opus complexity 11 is out of range; accepted 0\.\.10"):
        encode_audio(speechish(0.1), 8000, "opus", opus_complexity=11)


def test_without_libopus_libsndfile_writes_it_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Stands in for a machine without libopus0: the loader finds nothing.
    monkeypatch.setattr(oggopus, "_lib", lambda: None)
    pcm = speechish(1.0)
    with caplog.at_level(logging.WARNING):
        data = encode_audio(pcm, 8000, "opus")
    out, rate = decode_audio(data, "opus")
    assert rate == 8000 and abs(out.size - pcm.size) <= 960
    assert any("libopus0" in r.getMessage() for r in caplog.records)


def read_pages(data: bytes) -> list[tuple[int, int, int, list[bytes]]]:
    """(flags, granule, sequence, packets completed on the page) of every page, checking the
    capture pattern and the checksum (RFC 3533); packets here never continue across pages."""
    pages, at = [], 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS"
        flags, granule, _, seq, crc, nseg = struct.unpack_from("<BqIIIB", data, at + 5)
        lacing = data[at + 27:at + 27 + nseg]
        size = 27 + nseg + sum(lacing)
        page = data[at:at + size]
        assert crc_by_the_book(page[:22] + bytes(4) + page[26:]) == crc
        body, packets, start, pos = page[27 + nseg:], [], 0, 0
        for lace in lacing:
            pos += lace
            if lace < 255:
                packets.append(body[start:pos])
                start = pos
        assert start == len(body)
        pages.append((flags, granule, seq, packets))
        at += size
    return pages


def test_pages_hold_at_most_255_lacing_values_and_carry_granule_positions() -> None:
    rng = np.random.default_rng(2)
    packets = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
               for n in rng.integers(1500, 2000, 140)]
    packet48 = 960
    data = oggopus.mux(packets, rate=8000, pre_skip=312, frames48=140 * packet48 - 500,
                       packet48=packet48, serial=7, vendor="test")
    pages = read_pages(data)
    assert [p[2] for p in pages] == list(range(len(pages)))
    assert pages[0][0] == 2 and pages[-1][0] == 4 and all(p[0] == 0 for p in pages[1:-1])
    head, tags = pages[0][3][0], pages[1][3][0]
    assert head[:8] == b"OpusHead" and struct.unpack_from("<BBHI", head, 8) == (1, 1, 312, 8000)
    assert tags[:8] == b"OpusTags" and pages[0][1] == pages[1][1] == 0
    audio = [p for page in pages[2:] for p in page[3]]
    assert audio == packets
    done = 0
    for _, granule, _, page_packets in pages[2:-1]:
        done += len(page_packets)
        assert granule == done * packet48
    assert pages[-1][1] == 312 + 140 * packet48 - 500
    assert len(pages) > 2 + 140 // oggopus.PAGE_PACKETS + 1  # big packets: lacing split them
