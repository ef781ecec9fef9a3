"""Audio codecs for sealed segments: each produces a standard file a stock tool opens.

- ``flac``: a FLAC file, 16-bit, lossless (``flac -t``, ``sox``).
- ``opus``: an Ogg Opus file at a target bitrate, lossy (``opusinfo``, ``opusdec``).
  Opus accepts 8, 12, 16, 24 and 48 kHz input. Written through libopus directly at the
  given complexity (``linerec_contract.oggopus``); where libopus cannot be loaded, through
  libsndfile (complexity 10: the same format at several times the CPU), with a warning.
- ``zstd-pcm``: a zstd skippable frame carrying the format (``RPCM``, rate, channels, bits),
  then one zstd frame of raw little-endian signed 16-bit PCM. ``zstd -d`` skips the first frame
  and writes exactly the PCM bytes.
"""

from __future__ import annotations

import functools
import io
import logging
import struct

import numpy as np
import soundfile as sf
import zstandard

from linerec_contract import oggopus
from linerec_contract.errors import FormatError

CODECS = ("flac", "opus", "zstd-pcm")
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_MIN_BITRATE = 6000
OPUS_MAX_BITRATE = 256000
OPUS_COMPLEXITY = 5
MAX_RATE = 192000
ZSTD_LEVEL = 3
# Skippable frame: magic 0x184D2A50, u32 LE length, then "RPCM", u32 rate, u16 channels, u16 bits.
_SKIP_MAGIC = 0x184D2A50
_PCM_INFO = struct.Struct("<4sIHH")
_SKIP_HEADER = struct.Struct("<II")
# The largest PCM a zstd-pcm payload may claim: 4 hours of 48 kHz mono (a decompression bomb
# guard; a segment is minutes long).
MAX_PCM_BYTES = 4 * 3600 * 48000 * 2


def check_pcm(pcm: np.ndarray, rate: int, codec: str) -> None:
    """Reject audio that the codecs cannot store, naming what is accepted."""
    if codec not in CODECS:
        raise FormatError(f"codec {codec!r} is not supported; accepted: {', '.join(CODECS)}")
    if not isinstance(pcm, np.ndarray) or pcm.dtype != np.int16 or pcm.ndim != 1:
        shape = getattr(pcm, "shape", "?")
        dtype = getattr(pcm, "dtype", type(pcm).__name__)
        raise FormatError(f"audio is {dtype} with shape {shape}; a 1-D int16 array is needed")
    if pcm.size == 0:
        raise FormatError("audio has no samples; a segment holds at least one frame")
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= MAX_RATE:
        raise FormatError(f"sample rate {rate!r} is out of range; accepted 1..{MAX_RATE} Hz")
    if codec == "opus" and rate not in OPUS_RATES:
        raise FormatError(
            f"sample rate {rate} Hz cannot be stored as opus; accepted: "
            f"{', '.join(str(r) for r in OPUS_RATES)} (or use flac / zstd-pcm)"
        )


def _opus_level(bitrate: int) -> float:
    # libsndfile maps level q to int((1 - q) * 250000 + 6000) bit/s per channel; +0.5 keeps
    # the truncation from landing one below the requested rate.
    return 1.0 - (bitrate - OPUS_MIN_BITRATE + 0.5) / (OPUS_MAX_BITRATE - OPUS_MIN_BITRATE)


def encode_audio(pcm: np.ndarray, rate: int, codec: str, *, opus_bitrate: int = 16000,
                 opus_complexity: int = OPUS_COMPLEXITY) -> bytes:
    """Encode 1-D int16 mono ``pcm`` at ``rate`` Hz into the file format of ``codec``."""
    check_pcm(pcm, rate, codec)
    if codec == "zstd-pcm":
        info = _PCM_INFO.pack(b"RPCM", rate, 1, 16)
        skip = _SKIP_HEADER.pack(_SKIP_MAGIC, len(info)) + info
        raw = pcm.astype("<i2", copy=False).tobytes()
        return skip + zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    buf = io.BytesIO()
    if codec == "flac":
        sf.write(buf, pcm, rate, format="FLAC", subtype="PCM_16")
        return buf.getvalue()
    if not OPUS_MIN_BITRATE <= opus_bitrate <= OPUS_MAX_BITRATE:
        raise FormatError(
            f"opus bitrate {opus_bitrate} is out of range; accepted "
            f"{OPUS_MIN_BITRATE}..{OPUS_MAX_BITRATE} bit/s"
        )
    if oggopus.available():
        return oggopus.encode(pcm, rate, opus_bitrate, opus_complexity)
    _warn_no_libopus()
    with sf.SoundFile(
        buf, "w", rate, 1, format="OGG", subtype="OPUS",
        compression_level=_opus_level(opus_bitrate),
    ) as out:
        out.write(pcm)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _warn_no_libopus() -> None:
    logging.getLogger(__name__).warning(
        "libopus.so.0 cannot be loaded (Debian package libopus0): opus is encoded through "
        "libsndfile at complexity 10, several times the CPU of seal.opus_complexity"
    )


def _decode_zstd_pcm(data: bytes) -> tuple[np.ndarray, int]:
    head = _SKIP_HEADER.size + _PCM_INFO.size
    if len(data) < head:
        raise FormatError(f"zstd-pcm data is {len(data)} bytes; its header alone is {head}")
    magic, length = _SKIP_HEADER.unpack_from(data)
    tag, rate, channels, bits = _PCM_INFO.unpack_from(data, _SKIP_HEADER.size)
    if magic != _SKIP_MAGIC or length != _PCM_INFO.size or tag != b"RPCM":
        raise FormatError("zstd-pcm data does not start with the RPCM skippable frame")
    if channels != 1 or bits != 16 or not 1 <= rate <= MAX_RATE:
        raise FormatError(
            f"zstd-pcm format is {channels} ch, {bits} bit, {rate} Hz; accepted: 1 ch, 16 bit, "
            f"1..{MAX_RATE} Hz"
        )
    frame = data[head:]
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as err:
        raise FormatError(f"zstd-pcm frame header is invalid: {err}") from err
    if size < 0 or size > MAX_PCM_BYTES or size % 2:
        raise FormatError(
            f"zstd-pcm frame declares {size} bytes; accepted: an even size up to {MAX_PCM_BYTES}"
        )
    try:
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.decompressobj()
        raw = reader.decompress(frame)
        if not reader.eof or reader.unused_data:
            raise FormatError("zstd-pcm data is truncated or has bytes after its frame")
    except zstandard.ZstdError as err:
        raise FormatError(f"zstd-pcm frame does not decompress: {err}") from err
    if len(raw) != size:
        raise FormatError(f"zstd-pcm frame gave {len(raw)} bytes; its header declares {size}")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16), rate


def decode_audio(data: bytes, codec: str) -> tuple[np.ndarray, int]:
    """Decode a file produced by :func:`encode_audio`: ``(1-D int16 samples, rate)``."""
    if codec not in CODECS:
        raise FormatError(f"codec {codec!r} is not supported; accepted: {', '.join(CODECS)}")
    if codec == "zstd-pcm":
        return _decode_zstd_pcm(data)
    expected = "FLAC" if codec == "flac" else "OGG"
    try:
        with sf.SoundFile(io.BytesIO(data), "r") as src:
            if src.format != expected or src.channels != 1:
                raise FormatError(
                    f"{codec} data holds {src.format} with {src.channels} channels; "
                    f"expected mono {expected}"
                )
            samples = src.read(dtype="int16")
            rate = int(src.samplerate)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise FormatError(f"{codec} data does not decode: {str(err).splitlines()[0]}") from err
    return np.asarray(samples, dtype=np.int16).reshape(-1), rate
