"""The one interface every capture source implements, and the factory that builds one from config.

A source delivers :class:`Block` objects: int16 frames already at the storage rate, with the
storage-rate frame index of their first frame, the frames lost just before them and their
capture time. Times come from the frame count anchored to the monotonic clock when a run
starts (at open and after every gap), with the wall clock read at the same instant beside it.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from appliance.config import CaptureSection
from linerec_contract.errors import ApplianceError, ConfigError

Clock = Callable[[], int]


class AudioError(ApplianceError):
    """A capture source cannot deliver audio."""


class DeviceLost(AudioError):
    """The device vanished or failed; retry later. ``at_mono_ns``: end of the last audio read."""

    def __init__(self, message: str, *, at_mono_ns: int | None = None) -> None:
        super().__init__(message)
        self.at_mono_ns = at_mono_ns


class SourceExhausted(AudioError):
    """A finite source (file, bounded simulation) has delivered everything."""

    exit_code = 0


class DeviceFormatError(ConfigError):
    """The device exists but refuses the configured channels, rate or sample format."""


@dataclass(frozen=True)
class Block:
    """Frames at the storage rate, as captured."""

    pcm: npt.NDArray[np.int16]
    """int16, shape (frames, channels), already at the storage rate."""
    frame_pos: int
    """Storage-rate frame index of ``pcm[0]`` in this stream."""
    lost_frames: int
    """Storage-rate frames lost just before this block (xrun): 0 normally."""
    mono_ns: int
    wall_ns: int
    xrun: bool = False

    @property
    def frames(self) -> int:
        return int(self.pcm.shape[0])


class CaptureSource(abc.ABC):
    """A source of storage-rate audio; ``read`` blocks for about one period."""

    channels: int
    storage_rate: int
    description: str
    live: bool = False
    """True for a device whose audio keeps flowing while nobody reads it (ALSA, PortAudio):
    after a restart the time it was not read is a gap. File and simulator sources continue
    exactly where they were asked to."""

    @abc.abstractmethod
    def open(self, start_frame: int) -> None:
        """Start (or restart) delivering; the first block has ``frame_pos == start_frame``."""

    @abc.abstractmethod
    def read(self) -> Block:
        """The next block; SourceExhausted at the end of a finite source, DeviceLost on loss."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device (idempotent)."""

    def finish(self) -> Block | None:
        """On a clean stop, before ``close``: frames still held back (a resampler's tail)."""
        return None

    def __enter__(self) -> CaptureSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Timeline:
    """Storage frame positions and capture times of one stream.

    ``anchor`` pins the next frame to "now" on the monotonic and wall clocks; every later
    frame's time follows from its index. Re-anchored at open and after each gap, so clock
    drift between the device and the host never accumulates across a loss.
    """

    def __init__(
        self, storage_rate: int, *, clock: Clock = time.monotonic_ns,
        wall: Clock = time.time_ns,
    ) -> None:
        self.rate = storage_rate
        self.clock = clock
        self.wall = wall
        self.pos = 0
        self._anchor_pos = 0
        self._anchor_mono = 0
        self._anchor_wall = 0

    def start(self, frame_pos: int, mono_ns: int | None = None) -> None:
        """Continue at ``frame_pos``; its first frame is captured at ``mono_ns`` (default now)."""
        self.pos = frame_pos
        self.anchor(mono_ns)

    def anchor(self, mono_ns: int | None = None) -> None:
        now = self.clock()
        mono = now if mono_ns is None else mono_ns
        self._anchor_pos = self.pos
        self._anchor_mono = mono
        self._anchor_wall = self.wall() - (now - mono)

    def times(self, frame_pos: int) -> tuple[int, int]:
        """(mono_ns, wall_ns) of frame ``frame_pos``."""
        offset = (frame_pos - self._anchor_pos) * 1_000_000_000 // self.rate
        return self._anchor_mono + offset, self._anchor_wall + offset

    def block(
        self, pcm: npt.NDArray[np.int16], *, lost: int = 0, xrun: bool = False,
        lost_at_mono: int | None = None,
    ) -> Block:
        """The block for ``pcm``, following ``lost`` lost frames.

        With ``lost``, the timeline re-anchors: ``pcm[0]`` was captured at ``lost_at_mono``
        (default now).
        """
        if lost:
            self.pos += lost
            self.anchor(lost_at_mono)
        mono, wall = self.times(self.pos)
        blk = Block(pcm=pcm, frame_pos=self.pos, lost_frames=lost, mono_ns=mono, wall_ns=wall,
                    xrun=xrun)
        self.pos += int(pcm.shape[0])
        return blk


class Pacer:
    """Releases file and simulator audio no faster than a device would (``realtime = true``)."""

    def __init__(self, rate: int, *, enabled: bool, clock: Clock = time.monotonic_ns,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.enabled = enabled
        self._clock = clock
        self._sleep = sleep
        self._t0 = 0
        self._frames = 0

    def start(self) -> None:
        self._t0 = self._clock()
        self._frames = 0

    def wait_for(self, frames: int) -> None:
        """Block until ``frames`` more frames would have been captured by a real device."""
        self._frames += frames
        if not self.enabled:
            return
        due = self._t0 + self._frames * 1_000_000_000 // self.rate
        delay = due - self._clock()
        if delay > 0:
            self._sleep(delay / 1e9)


def period_frames(rate: int, period_ms: int) -> int:
    return max(1, rate * period_ms // 1000)


def selected_channels(section: CaptureSection, available: int, what: str) -> int:
    """Channels to store: all of ``available`` (channels = 0) or the first ``channels``."""
    wanted = section.channels or available
    if wanted > available:
        raise ConfigError(
            f"capture.channels = {section.channels}: {what} has {available} channels "
            f"(accepted: 0 for all, or 1..{available})"
        )
    check_line_map(section, wanted)
    return wanted


def check_line_map(section: CaptureSection, channels: int) -> None:
    """Every mapped line must name a captured channel."""
    for m in section.lines:
        if m.channel > channels:
            raise ConfigError(
                f"capture.lines: line {m.line!r} is on channel {m.channel}, but stream "
                f"{section.name!r} captures {channels} channels (accepted: 1..{channels})"
            )


def open_source(section: CaptureSection) -> CaptureSource:
    """The source a capture section describes (not yet opened); ConfigError when it cannot be."""
    if section.source == "simulator":
        from appliance.audio.simsource import SimulatorSource

        return SimulatorSource.from_section(section)
    if section.source == "wav":
        from appliance.audio.wavfile import WavSource

        return WavSource.from_section(section)
    if section.source == "alsa":
        from appliance.audio.alsa import AlsaSource

        return AlsaSource.from_section(section)
    if section.source == "portaudio":
        from appliance.audio.portaudio import PortAudioSource

        return PortAudioSource.from_section(section)
    raise ConfigError(
        f"capture.source = {section.source!r}: accepted: alsa, portaudio, wav, simulator"
    )
