"""PortAudio capture through sounddevice (for hosts where ALSA is not the API, or via its ALSA
host API). Blocking reads of one period; PortAudio's overflow flag becomes an xrun whose loss
is estimated from the monotonic clock, as for ALSA."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from appliance.audio.convert import FORMATS, Converter, storage_frames
from appliance.audio.source import (
    Block,
    CaptureSource,
    Clock,
    DeviceFormatError,
    DeviceLost,
    Timeline,
    check_line_map,
)
from appliance.config import CaptureSection
from linerec_contract.errors import DependencyError

log = logging.getLogger(__name__)

PA_DTYPES = {"S16_LE": "int16", "S24_3LE": "int24", "S32_LE": "int32", "FLOAT_LE": "float32"}


def _sd() -> Any:
    try:
        import sounddevice
    except OSError as err:  # the PortAudio shared library is missing
        raise DependencyError(f"PortAudio is not available ({err}); install libportaudio2 "
                              "or use capture.source = 'alsa'") from err
    return sounddevice


def find_device(name: str) -> tuple[int | None, dict[str, Any]]:
    """(index, info) of the input device ``name`` (exact name first, then a substring)."""
    sd = _sd()
    try:
        if name == "auto":
            info = dict(sd.query_devices(kind="input"))
            return None, info
        devices = [dict(d) for d in sd.query_devices()]
    except sd.PortAudioError as err:
        raise DeviceLost(f"PortAudio cannot list devices: {err}") from err
    inputs = [(i, d) for i, d in enumerate(devices) if int(d["max_input_channels"]) > 0]
    for i, d in inputs:
        if d["name"] == name:
            return i, d
    matches = [(i, d) for i, d in inputs if name in str(d["name"])]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(repr(d["name"]) for _, d in inputs) or "none"
    what = "several" if matches else "no"
    raise DeviceLost(f"capture.device = {name!r}: {what} PortAudio input devices match "
                     f"(inputs: {names})")


class PortAudioSource(CaptureSource):
    """A sounddevice RawInputStream read one period at a time."""

    live = True

    def __init__(
        self, device: str, *, storage_rate: int, channels: int = 0, rate: int = 0,
        sample_format: str = "auto", period_ms: int = 20, buffer_ms: int = 200,
        clock: Clock | None = None,
    ) -> None:
        self.device = device
        self.storage_rate = storage_rate
        self.channels = channels
        self._want_rate = rate
        self._want_fmt = sample_format
        self._period_ms = period_ms
        self._buffer_ms = buffer_ms
        self._clock = clock or time.monotonic_ns
        self._timeline = Timeline(storage_rate, clock=self._clock)
        self.description = f"portaudio {device}"
        self._stream: Any = None
        self._conv: Converter | None = None
        self._period = 0
        self._failed: DeviceLost | None = None
        self._last_read = 0
        self._seg_in = self._seg_out = 0
        self._ready: deque[Block] = deque()

    @classmethod
    def from_section(cls, section: CaptureSection) -> PortAudioSource:
        if section.channels:
            check_line_map(section, section.channels)
        return cls(
            section.device, storage_rate=section.storage_rate, channels=section.channels,
            rate=section.rate, sample_format=section.sample_format, period_ms=section.period_ms,
            buffer_ms=section.buffer_ms,
        )

    def open(self, start_frame: int) -> None:
        self.close()
        sd = _sd()
        index, info = find_device(self.device)
        fmt = "S32_LE" if self._want_fmt == "auto" else self._want_fmt
        if fmt not in PA_DTYPES:
            raise DeviceFormatError(
                f"capture.sample_format = {fmt!r}: PortAudio cannot deliver it; accepted: "
                f"{', '.join(f for f in FORMATS if f in PA_DTYPES)}")
        max_ch = int(info["max_input_channels"])
        channels = self.channels or max_ch
        if channels > max_ch:
            raise DeviceFormatError(f"capture.channels = {channels}: PortAudio device "
                                    f"{info['name']!r} has at most {max_ch} input channels")
        rate = self._want_rate or int(info["default_samplerate"])
        dev = index if index is not None else sd.default.device[0]
        try:
            sd.check_input_settings(device=dev, channels=channels, dtype=PA_DTYPES[fmt],
                                    samplerate=rate)
        except (sd.PortAudioError, ValueError) as err:
            raise DeviceFormatError(
                f"PortAudio device {info['name']!r} refuses {fmt} x {channels} ch at {rate} Hz "
                f"({err}); its default rate is {info['default_samplerate']:.0f} Hz and it has "
                f"{max_ch} input channels") from err
        self._period = max(16, rate * self._period_ms // 1000)
        try:
            stream = sd.RawInputStream(
                samplerate=rate, blocksize=self._period, device=dev, channels=channels,
                dtype=PA_DTYPES[fmt], latency=self._buffer_ms / 1000.0)
            stream.start()
        except sd.PortAudioError as err:
            raise DeviceLost(f"PortAudio device {info['name']!r} cannot be opened: {err}") from err
        self._stream = stream
        self.channels = channels
        self._conv = Converter(fmt=fmt, device_channels=channels, select=range(channels),
                               in_rate=rate, out_rate=self.storage_rate)
        self.description = f"portaudio {info['name']} ({fmt}, {channels} ch, {rate} Hz)"
        self._failed = None
        self._seg_in = self._seg_out = 0
        self._ready.clear()
        self._timeline.start(start_frame)
        self._last_read = self._clock()

    def read(self) -> Block:
        if self._ready:
            return self._ready.popleft()
        if self._failed is not None:
            raise self._failed
        stream, conv = self._stream, self._conv
        if stream is None or conv is None:
            raise RuntimeError("read() before open()")
        sd = _sd()
        lost, xrun, at = 0, False, None
        while True:
            try:
                data, overflowed = stream.read(self._period)
            except sd.PortAudioError as err:
                self._failed = DeviceLost(f"PortAudio device {self.device!r} failed: {err}",
                                          at_mono_ns=self._last_read)
                self.close()
                if self._ready:
                    return self._ready.popleft()
                raise self._failed from err
            now = self._clock()
            raw = bytes(data)
            frames = len(raw) // conv.frame_bytes
            if overflowed:
                # PortAudio dropped input before this read: end the run there.
                expected = (now - self._last_read) * conv.in_rate // 1_000_000_000
                lost_device = max(0, expected - frames)
                tail = conv.flush()
                produced = self._seg_out + tail.shape[0]
                lost += max(0, storage_frames(self._seg_in + lost_device, conv.in_rate,
                                              conv.out_rate) - produced)
                xrun = True
                at = now - frames * 1_000_000_000 // conv.in_rate
                self._seg_in = self._seg_out = 0
                log.warning("%s: input overflow, about %d device frames lost",
                            self.description, lost_device)
                if tail.shape[0]:
                    self._ready.append(self._timeline.block(tail))
            self._last_read = now
            self._seg_in += frames
            out = conv.push(raw)
            if out.shape[0]:
                self._seg_out += out.shape[0]
                self._ready.append(
                    self._timeline.block(out, lost=lost, xrun=xrun, lost_at_mono=at))
                lost, xrun, at = 0, False, None
            if self._ready and not lost:
                return self._ready.popleft()

    def finish(self) -> Block | None:
        conv = self._conv
        if conv is None or self._failed is not None:
            return None
        tail = conv.flush()
        return self._timeline.block(tail) if tail.shape[0] else None

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
                stream.close()
            except _sd().PortAudioError as err:  # a vanished device may fail to close
                log.debug("closing %s: %s", self.device, err)
        self._conv = None

