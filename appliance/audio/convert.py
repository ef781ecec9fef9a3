"""Sample-format conversion, channel selection and streaming resampling to the storage rate.

Everything here is vectorised numpy; the only per-sample loop is inside libsoxr. The path a
device's bytes take is ``decode`` (interleaved bytes -> float32 or int16 frames), ``select``
(the device channels kept, in stored order), ``StreamResampler`` (device rate -> storage rate,
one stateful resampler per stream) and ``to_int16`` (round and clip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import soxr

from linerec_contract.errors import ConfigError

FloatFrames = npt.NDArray[np.float32]
Int16Frames = npt.NDArray[np.int16]

FormatName = Literal["S16_LE", "S24_3LE", "S24_LE", "S32_LE", "FLOAT_LE"]
FORMATS: tuple[FormatName, ...] = ("S16_LE", "S24_3LE", "S24_LE", "S32_LE", "FLOAT_LE")
BYTES_PER_SAMPLE: dict[str, int] = {
    "S16_LE": 2, "S24_3LE": 3, "S24_LE": 4, "S32_LE": 4, "FLOAT_LE": 4,
}
RESAMPLER_QUALITY = "HQ"
"""libsoxr quality: a steep anti-alias filter below the storage Nyquist (4 kHz at 8 kHz)."""


def check_format(name: str) -> FormatName:
    """``name`` as a supported sample format; ConfigError naming the accepted ones otherwise."""
    for fmt in FORMATS:
        if fmt == name:
            return fmt
    raise ConfigError(f"sample format {name!r} is not supported; accepted: {', '.join(FORMATS)}")


def frame_bytes(fmt: str, channels: int) -> int:
    return BYTES_PER_SAMPLE[fmt] * channels


def decode_float(data: bytes, fmt: str, channels: int) -> FloatFrames:
    """Interleaved little-endian samples -> float32 frames in [-1, 1), shape (frames, channels).

    S24_LE keeps 24 bits in the low three bytes of a 32-bit word; the top byte is ignored
    (devices fill it with sign extension or leave it as garbage).
    """
    width = frame_bytes(fmt, channels)
    if len(data) % width:
        raise ValueError(f"{len(data)} bytes is not a whole number of {fmt} x {channels} frames")
    frames = len(data) // width
    if fmt == "S16_LE":
        out = np.frombuffer(data, dtype="<i2").astype(np.float32)
        out *= np.float32(1.0 / 32768.0)
    elif fmt == "S32_LE":
        out = np.frombuffer(data, dtype="<i4").astype(np.float32)
        out *= np.float32(1.0 / 2**31)
    elif fmt == "S24_LE":
        words = np.frombuffer(data, dtype="<i4")
        # Shift the 24-bit value to the top of the word: the sign comes out right and any top
        # byte is dropped.
        out = np.left_shift(words, 8).astype(np.float32)
        out *= np.float32(1.0 / 2**31)
    elif fmt == "S24_3LE":
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
        wide = np.zeros((raw.shape[0], 4), dtype=np.uint8)
        wide[:, 1:] = raw  # little endian: [0, b0, b1, b2] is the sample << 8 as an int32
        out = wide.view("<i4").reshape(-1).astype(np.float32)
        out *= np.float32(1.0 / 2**31)
    elif fmt == "FLOAT_LE":
        out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    else:
        check_format(fmt)
        raise AssertionError(fmt)  # pragma: no cover - check_format raised
    return out.reshape(frames, channels)


def decode_int16(data: bytes, channels: int) -> Int16Frames:
    """S16_LE bytes -> int16 frames without a float round trip (the cheap path)."""
    if len(data) % (2 * channels):
        raise ValueError(f"{len(data)} bytes is not a whole number of S16_LE x {channels} frames")
    return np.frombuffer(data, dtype="<i2").reshape(-1, channels).astype(np.int16)


def encode(frames: FloatFrames, fmt: str) -> bytes:
    """float32 frames -> interleaved little-endian bytes (the inverse of ``decode_float``).

    Used to build test signals and benchmark input; full scale is clipped, not wrapped.
    """
    x = np.asarray(frames, dtype=np.float64).reshape(-1)
    if fmt == "FLOAT_LE":
        return x.astype("<f4").tobytes()
    if fmt == "S16_LE":
        return np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2").tobytes()
    v24 = np.clip(np.rint(x * 2**23), -(2**23), 2**23 - 1).astype("<i4")
    if fmt == "S24_LE":
        return v24.tobytes()
    if fmt == "S24_3LE":
        return v24.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if fmt == "S32_LE":
        return np.clip(np.rint(x * 2**31), -(2**31), 2**31 - 1).astype("<i4").tobytes()
    check_format(fmt)
    raise AssertionError(fmt)  # pragma: no cover


def to_int16(frames: FloatFrames) -> Int16Frames:
    """float32 frames -> int16, rounded to nearest and clipped at full scale."""
    scaled: FloatFrames = np.rint(frames * np.float32(32768.0))
    np.clip(scaled, -32768.0, 32767.0, out=scaled)
    return scaled.astype(np.int16)


def check_selection(select: Sequence[int], device_channels: int) -> list[int]:
    """The 0-based device channels to keep, in stored order; ConfigError if one does not exist."""
    chosen = list(select)
    if not chosen:
        raise ConfigError("channel selection is empty; keep at least one device channel")
    for ch in chosen:
        if not 0 <= ch < device_channels:
            raise ConfigError(
                f"channel {ch + 1} does not exist on a {device_channels}-channel device "
                f"(accepted: 1..{device_channels})"
            )
    return chosen


class StreamResampler:
    """Streaming device-rate -> storage-rate resampler for one stream (libsoxr, stateful).

    Output frame ``k`` of a continuous run is the signal at time ``k / out_rate`` after the
    run's first input frame: libsoxr compensates its filter delay, so the output only lags in
    *when* it is produced (it comes in bursts), never in *where* it lands. ``flush`` ends a run
    (at a gap) and emits the rest, so a run of ``n`` input frames yields about
    ``n * out_rate / in_rate`` output frames; the next ``process`` starts a fresh run.
    """

    def __init__(self, in_rate: int, out_rate: int, channels: int) -> None:
        if in_rate <= 0 or out_rate <= 0 or channels <= 0:
            raise ValueError(f"resampler {in_rate} -> {out_rate} Hz x {channels}: bad parameters")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.channels = channels
        self._stream: soxr.ResampleStream | None = None

    @property
    def passthrough(self) -> bool:
        return self.in_rate == self.out_rate

    def process(self, frames: FloatFrames) -> FloatFrames:
        if self.passthrough:
            return frames
        if self._stream is None:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, self.channels, dtype="float32",
                quality=RESAMPLER_QUALITY,
            )
        out = self._stream.resample_chunk(np.ascontiguousarray(frames, dtype=np.float32))
        return np.asarray(out, dtype=np.float32).reshape(-1, self.channels)

    def flush(self) -> FloatFrames:
        """End the current run: the output still held in the filter, then a fresh state."""
        stream, self._stream = self._stream, None
        if stream is None:
            return np.zeros((0, self.channels), dtype=np.float32)
        tail = stream.resample_chunk(np.zeros((0, self.channels), dtype=np.float32), last=True)
        return np.asarray(tail, dtype=np.float32).reshape(-1, self.channels)


class Converter:
    """Device bytes -> int16 frames at the storage rate, for one stream.

    Keeps ``select`` (0-based device channels, in stored order). When no resampling is
    needed and the device gives S16_LE, the bytes never go through floats.
    """

    def __init__(
        self, *, fmt: str, device_channels: int, select: Sequence[int], in_rate: int,
        out_rate: int,
    ) -> None:
        self.fmt = check_format(fmt)
        self.device_channels = device_channels
        self.select = check_selection(select, device_channels)
        self._identity = self.select == list(range(device_channels))
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.resampler = StreamResampler(in_rate, out_rate, len(self.select))
        self.frame_bytes = frame_bytes(fmt, device_channels)

    @property
    def channels(self) -> int:
        return len(self.select)

    def push(self, data: bytes) -> Int16Frames:
        """Convert a run of whole device frames; may return 0 frames while the filter fills."""
        if self.fmt == "S16_LE" and self.resampler.passthrough:
            pcm = decode_int16(data, self.device_channels)
            return pcm if self._identity else np.ascontiguousarray(pcm[:, self.select])
        return to_int16(self.resampler.process(self.push_float(data)))

    def push_float(self, data: bytes) -> FloatFrames:
        x = decode_float(data, self.fmt, self.device_channels)
        return x if self._identity else np.ascontiguousarray(x[:, self.select])

    def flush(self) -> Int16Frames:
        """End of a continuous run (gap or close): the resampler's last frames."""
        return to_int16(self.resampler.flush())


def storage_frames(device_frames: int, in_rate: int, out_rate: int) -> int:
    """Storage-rate frames that ``device_frames`` at ``in_rate`` span (rounded)."""
    return (device_frames * out_rate + in_rate // 2) // in_rate
