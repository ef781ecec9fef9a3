"""ALSA capture through pyalsaaudio: device naming, hardware-parameter probing and the source.

Devices are named the stable ALSA way (``hw:CARD=<id>,DEV=<n>``, or any PCM name the ALSA
configuration defines), never by index. pyalsaaudio applies the requested format, channels and
rate on a best-effort basis and silently keeps what the device accepts, so every open is
checked against what was asked and a refusal names what the device supports.

Overruns: pyalsaaudio reports one as ``read() -> (-EPIPE, b"")`` after re-preparing the PCM.
ALSA does not say how much was lost; the buffer was full (its frames are discarded by the
re-prepare) and everything captured since the previous read is gone, so the loss is taken as
``max(buffer_size, time since the previous read x rate)``.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import alsaaudio
import numpy as np

from appliance.audio.alsalib import route_alsa_messages
from appliance.audio.convert import FORMATS, Converter, FormatName, Int16Frames, storage_frames
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
from linerec_contract.errors import ConfigError

log = logging.getLogger(__name__)
route_alsa_messages()

ALSAAudioError = alsaaudio.ALSAAudioError
PCM_FORMATS: dict[str, int] = {name: getattr(alsaaudio, f"PCM_FORMAT_{name}") for name in FORMATS}
FORMAT_PREFERENCE: tuple[FormatName, ...] = ("S16_LE", "S32_LE", "S24_LE", "S24_3LE", "FLOAT_LE")
"""'auto' picks the first the device offers: S16 is the cheapest to convert."""
RATE_PREFERENCE = (48000, 44100, 16000, 96000, 32000, 22050, 11025, 8000)
STANDARD_RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
CHANNEL_PROBE = 65
"""One more than config allows: a device that takes this many is a converting plugin."""
MAX_EMPTY_READS = 100

PcmFactory = Callable[..., Any]


@dataclass(frozen=True)
class DeviceCaps:
    """What a capture PCM accepts, from its hardware-parameter space."""

    name: str
    formats: tuple[str, ...]
    """Every format the PCM accepts, in ALSA's names."""
    channels: tuple[int, ...] | None
    """Accepted channel counts; None when any count is accepted (a converting plugin)."""
    rates: tuple[int, int] | tuple[int, ...]
    """(min, max) of a continuous range, or the standard rates accepted."""
    rate_range: bool

    @property
    def supported_formats(self) -> tuple[str, ...]:
        return tuple(f for f in FORMATS if f in self.formats)

    def accepts_rate(self, rate: int) -> bool:
        if self.rate_range:
            return self.rates[0] <= rate <= self.rates[1]
        return rate in self.rates

    def describe_rates(self) -> str:
        if self.rate_range:
            return f"{self.rates[0]}-{self.rates[1]} Hz"
        return ", ".join(str(r) for r in self.rates) + " Hz"

    def describe_channels(self) -> str:
        if self.channels is None:
            return "any"
        ch = self.channels
        if len(ch) > 2 and ch == tuple(range(ch[0], ch[-1] + 1)):
            return f"{ch[0]}-{ch[-1]}"
        return ", ".join(str(c) for c in ch)


def resolve_device(name: str) -> str:
    """The PCM name for ``capture.device``: 'auto' = first card, a bare card id = its hw PCM."""
    if name == "auto":
        cards = alsaaudio.cards()
        if not cards:
            raise DeviceLost("no ALSA sound card found (capture.device = 'auto'); "
                             "plug in the audio interface or name a PCM, see 'appliance devices'")
        return f"hw:CARD={cards[0]},DEV=0"
    if ":" not in name and name in alsaaudio.cards():
        return f"hw:CARD={name},DEV=0"
    return name


def _open(factory: PcmFactory, device: str, *, fmt: str, channels: int, rate: int,
          periodsize: int = 160, periods: int = 4, nonblock: bool = False) -> Any:
    try:
        return factory(
            type=alsaaudio.PCM_CAPTURE,
            mode=alsaaudio.PCM_NONBLOCK if nonblock else alsaaudio.PCM_NORMAL,
            device=device, rate=rate, channels=channels, format=PCM_FORMATS[fmt],
            periodsize=periodsize, periods=periods,
        )
    except ALSAAudioError as err:
        raise DeviceLost(f"ALSA device {device!r} cannot be opened for capture: {err} "
                         "(see 'appliance devices')") from err


def caps_of(pcm: Any, name: str) -> DeviceCaps:
    """Capabilities of an open PCM (pyalsaaudio's probes over its full parameter space)."""
    unbounded = int(pcm.info()["channels"]) == CHANNEL_PROBE
    formats = tuple(str(f) for f in pcm.getformats())
    channels = None if unbounded else tuple(int(c) for c in pcm.getchannels())
    rates = pcm.getrates()
    if isinstance(rates, int):
        return DeviceCaps(name, formats, channels, (rates,), False)
    if isinstance(rates, tuple):
        lo, hi = int(rates[0]), int(rates[1])
        return DeviceCaps(name, formats, channels, (lo, hi), True)
    return DeviceCaps(name, formats, channels, tuple(int(r) for r in rates), False)


def probe(device: str, *, factory: PcmFactory | None = None) -> DeviceCaps:
    """Open ``device`` without blocking and read its capabilities."""
    pcm = _open(factory or alsaaudio.PCM, device, fmt="S16_LE", channels=CHANNEL_PROBE,
                rate=48000, nonblock=True)
    try:
        return caps_of(pcm, device)
    finally:
        pcm.close()


@dataclass(frozen=True)
class Choice:
    fmt: FormatName
    device_channels: int
    channels: int
    rate: int


def choose(caps: DeviceCaps, *, fmt: str, channels: int, rate: int, storage_rate: int) -> Choice:
    """Settings for ``caps`` from config values ('auto' / 0 = choose); DeviceFormatError if
    the device cannot do what was asked."""
    dev = caps.name
    offered = caps.supported_formats
    if fmt == "auto":
        pick = next((f for f in FORMAT_PREFERENCE if f in offered), None)
        if pick is None:
            raise DeviceFormatError(
                f"ALSA device {dev!r} offers none of the formats capture reads "
                f"({', '.join(FORMATS)}); it supports {', '.join(caps.formats) or 'nothing'}")
        chosen_fmt: FormatName = pick
    elif fmt in offered:
        chosen_fmt = next(f for f in FORMATS if f == fmt)
    else:
        raise DeviceFormatError(
            f"capture.sample_format = {fmt!r}: ALSA device {dev!r} refuses it; it supports "
            f"{', '.join(caps.formats) or 'no format'}")
    if rate:
        if not caps.accepts_rate(rate):
            raise DeviceFormatError(f"capture.rate = {rate}: ALSA device {dev!r} refuses it; "
                                    f"it supports {caps.describe_rates()}")
        chosen_rate = rate
    else:
        pick_rate = next((r for r in (storage_rate, *RATE_PREFERENCE) if caps.accepts_rate(r)),
                         None)
        chosen_rate = pick_rate if pick_rate is not None else int(caps.rates[-1])
    if caps.channels is None:
        if not channels:
            raise ConfigError(f"capture.channels = 0: ALSA device {dev!r} accepts any channel "
                              "count (it is a converting plugin); set capture.channels")
        return Choice(chosen_fmt, channels, channels, chosen_rate)
    if not channels:
        return Choice(chosen_fmt, max(caps.channels), max(caps.channels), chosen_rate)
    wider = [c for c in caps.channels if c >= channels]
    if not wider:
        raise DeviceFormatError(f"capture.channels = {channels}: ALSA device {dev!r} has at most "
                                f"{max(caps.channels)} (it supports {caps.describe_channels()})")
    # A device that only opens with more channels than kept: open it wide, keep the first ones.
    return Choice(chosen_fmt, min(wider), channels, chosen_rate)


class AlsaSource(CaptureSource):
    """Blocking reads of one period from an ALSA capture PCM, converted to the storage rate."""

    live = True

    def __init__(
        self, device: str, *, storage_rate: int, channels: int = 0, rate: int = 0,
        sample_format: str = "auto", period_ms: int = 20, buffer_ms: int = 200,
        pcm_factory: PcmFactory | None = None, clock: Clock | None = None,
    ) -> None:
        self.device = device
        self.storage_rate = storage_rate
        self.channels = channels
        self._want_rate = rate
        self._want_fmt = sample_format
        self._period_ms = period_ms
        self._buffer_ms = buffer_ms
        self._factory: PcmFactory = pcm_factory or alsaaudio.PCM
        self._clock = clock or time.monotonic_ns
        self._timeline = Timeline(storage_rate, clock=self._clock)
        self.description = f"alsa {device}"
        self._pcm: Any = None
        self._conv: Converter | None = None
        self.choice: Choice | None = None
        self.buffer_frames = 0
        self._reset_run_state()

    @classmethod
    def from_section(cls, section: CaptureSection) -> AlsaSource:
        if section.channels:
            check_line_map(section, section.channels)
        return cls(
            section.device, storage_rate=section.storage_rate, channels=section.channels,
            rate=section.rate, sample_format=section.sample_format, period_ms=section.period_ms,
            buffer_ms=section.buffer_ms,
        )

    def _reset_run_state(self) -> None:
        self._started = False
        self._seg_in = 0  # device frames read in the current continuous run
        self._seg_out = 0  # storage frames produced from them
        self._last_read = 0
        self._pending_lost = 0
        self._pending_xrun = False
        self._pending_mono: int | None = None
        self._failed: DeviceLost | None = None
        self._empty_reads = 0

    def open(self, start_frame: int) -> None:
        self.close()
        name = resolve_device(self.device)
        caps = probe(name, factory=self._factory)
        choice = choose(caps, fmt=self._want_fmt, channels=self.channels, rate=self._want_rate,
                        storage_rate=self.storage_rate)
        period = max(16, choice.rate * self._period_ms // 1000)
        periods = max(2, self._buffer_ms // self._period_ms)
        pcm = _open(self._factory, name, fmt=choice.fmt, channels=choice.device_channels,
                    rate=choice.rate, periodsize=period, periods=periods)
        try:
            info = pcm.info()
            got = (str(info["format_name"]), int(info["channels"]), int(info["rate"]))
            if got != (choice.fmt, choice.device_channels, choice.rate):
                raise DeviceFormatError(
                    f"ALSA device {name!r} opened as {got[0]} x {got[1]} ch at {got[2]} Hz "
                    f"instead of {choice.fmt} x {choice.device_channels} ch at {choice.rate} Hz; "
                    f"it supports formats {', '.join(caps.formats)}, channels "
                    f"{caps.describe_channels()}, rates {caps.describe_rates()}")
            self.buffer_frames = int(info["buffer_size"])
        except BaseException:
            pcm.close()
            raise
        self._pcm = pcm
        self.choice = choice
        self.channels = choice.channels
        self._conv = Converter(fmt=choice.fmt, device_channels=choice.device_channels,
                               select=range(choice.channels), in_rate=choice.rate,
                               out_rate=self.storage_rate)
        self.description = (f"alsa {name} ({choice.fmt}, {choice.device_channels} ch, "
                            f"{choice.rate} Hz)")
        self._reset_run_state()
        self._timeline.start(start_frame)

    def read(self) -> Block:
        if self._failed is not None:
            raise self._failed
        pcm, conv = self._pcm, self._conv
        if pcm is None or conv is None:
            raise RuntimeError("read() before open()")
        while True:
            if not self._started:
                # Capture starts with the first read: that instant is the first frame's time.
                self._started = True
                self._timeline.anchor()
                self._last_read = self._clock()
            try:
                n, data = pcm.read()
            except ALSAAudioError as err:
                return self._lost(f"ALSA device {self.device!r} failed: {err}")
            if n == -errno.EPIPE:
                tail = self._overrun(conv)
                if tail.shape[0]:
                    return self._timeline.block(tail)
                continue
            if n <= 0 or not data:
                self._empty_reads += 1
                if self._empty_reads > MAX_EMPTY_READS:
                    return self._lost(f"ALSA device {self.device!r} returns no audio")
                continue
            self._empty_reads = 0
            self._last_read = self._clock()
            self._seg_in += len(data) // conv.frame_bytes
            out = conv.push(data)
            if not out.shape[0]:
                continue  # the resampler is filling up
            self._seg_out += out.shape[0]
            blk = self._timeline.block(out, lost=self._pending_lost, xrun=self._pending_xrun,
                                       lost_at_mono=self._pending_mono)
            self._pending_lost, self._pending_xrun, self._pending_mono = 0, False, None
            return blk

    def _overrun(self, conv: Converter) -> Int16Frames:
        """End the run at an overrun: the resampler's tail now, the loss on the next block."""
        now = self._clock()
        since_last = (now - self._last_read) * conv.in_rate // 1_000_000_000
        lost_device = max(self.buffer_frames, since_last)
        tail = conv.flush()
        produced = self._seg_out + tail.shape[0]
        lost = max(0, storage_frames(self._seg_in + lost_device, conv.in_rate, conv.out_rate)
                   - produced)
        log.warning("%s: overrun, about %d device frames lost", self.description, lost_device)
        self._pending_lost += lost
        self._pending_xrun = True
        self._pending_mono = now
        self._seg_in = self._seg_out = 0
        self._last_read = now
        return tail

    def _lost(self, message: str) -> Block:
        """The device failed: hand out what the resampler still holds, then DeviceLost."""
        conv = self._conv
        tail = conv.flush() if conv is not None else np.zeros((0, 1), dtype=np.int16)
        self._failed = DeviceLost(message, at_mono_ns=self._last_read)
        self._close_pcm()
        if tail.shape[0] and not self._pending_lost:
            return self._timeline.block(tail)
        raise self._failed

    def finish(self) -> Block | None:
        conv = self._conv
        if conv is None or self._failed is not None:
            return None
        tail = conv.flush()
        return self._timeline.block(tail) if tail.shape[0] else None

    def _close_pcm(self) -> None:
        pcm, self._pcm = self._pcm, None
        if pcm is not None:
            try:
                pcm.close()
            except ALSAAudioError as err:
                log.debug("closing %s: %s", self.device, err)

    def close(self) -> None:
        self._close_pcm()
        self._conv = None
