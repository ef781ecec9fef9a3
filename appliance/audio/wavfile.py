"""Replay of a WAV (or any libsndfile-readable) file as a capture source.

``open(n)`` continues at storage frame ``n``. When the file is at the storage rate that is
sample-exact. When it must be resampled, the resampler restarts a little earlier, at a frame
where input and output sample instants coincide, and the frames before ``n`` are dropped: the
continuation then matches an uninterrupted run to within rounding (one LSB).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import soundfile

from appliance.audio.convert import Int16Frames, StreamResampler, to_int16
from appliance.audio.source import (
    Block,
    CaptureSource,
    Clock,
    Pacer,
    SourceExhausted,
    Timeline,
    period_frames,
    selected_channels,
)
from appliance.config import CaptureSection
from linerec_contract.errors import ConfigError

WARMUP_FRAMES = 4096
"""Storage frames replayed (and dropped) before a resampled continuation: > 2x the filter."""
FAST_CHUNK_S = 0.25


class WavSource(CaptureSource):
    """A sound file replayed at the storage rate; ends with SourceExhausted."""

    live = False

    def __init__(
        self, path: Path, *, storage_rate: int, channels: int = 0, period_ms: int = 20,
        realtime: bool = False, end_frame: int | None = None, clock: Clock | None = None,
    ) -> None:
        self.path = Path(path)
        try:
            info = soundfile.info(str(self.path))
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            raise ConfigError(
                f"capture.wav_path {self.path}: cannot be read as a sound file ({err})"
            ) from err
        self.file_rate = int(info.samplerate)
        self.file_channels = int(info.channels)
        self.channels = channels or self.file_channels
        if not 1 <= self.channels <= self.file_channels:
            raise ConfigError(
                f"capture.channels = {channels}: {self.path} has {self.file_channels} channels "
                f"(accepted: 0 for all, or 1..{self.file_channels})"
            )
        self.storage_rate = storage_rate
        self.end_frame = end_frame
        self.description = (f"wav {self.path} ({self.file_channels} ch, {self.file_rate} Hz, "
                            f"{info.subtype})")
        self._exact = self.file_rate == storage_rate and info.subtype == "PCM_16"
        chunk = period_frames(self.file_rate, period_ms)
        self._chunk = chunk if realtime else max(chunk, int(self.file_rate * FAST_CHUNK_S))
        clock = clock or time.monotonic_ns
        self._timeline = Timeline(storage_rate, clock=clock)
        self._pacer = Pacer(storage_rate, enabled=realtime, clock=clock)
        self._file: soundfile.SoundFile | None = None
        self._resampler = StreamResampler(self.file_rate, storage_rate, self.channels)
        self._drop = 0
        self._eof = False

    @classmethod
    def from_section(cls, section: CaptureSection) -> WavSource:
        if section.wav_path is None:
            raise ConfigError(f"capture stream {section.name!r}: source = 'wav' needs wav_path")
        src = cls(
            section.wav_path, storage_rate=section.storage_rate, channels=section.channels,
            period_ms=section.period_ms, realtime=section.realtime,
            end_frame=round(section.stop_after_s * section.storage_rate)
            if section.stop_after_s else None,
        )
        selected_channels(section, src.file_channels, f"{section.wav_path}")
        return src

    def open(self, start_frame: int) -> None:
        if start_frame < 0:
            raise ValueError(f"start_frame {start_frame} must be non-negative")
        self.close()
        self._file = soundfile.SoundFile(str(self.path))
        self._resampler.flush()
        self._eof = False
        if self._resampler.passthrough:
            in_frame, self._drop = start_frame, 0
        else:
            # Output k of a run that starts at input frame s sits at time s/in + k/out. Restart
            # at a storage frame k0 whose instant is also an input frame instant.
            g = math.gcd(self.file_rate, self.storage_rate)
            p_out, p_in = self.storage_rate // g, self.file_rate // g
            k0 = max(0, (start_frame - WARMUP_FRAMES) // p_out * p_out)
            in_frame, self._drop = k0 // p_out * p_in, start_frame - k0
        if in_frame < self._file.frames:
            self._file.seek(in_frame)
        else:
            self._eof = True
        self._timeline.start(start_frame)
        self._pacer.start()

    def read(self) -> Block:
        while True:
            pcm = self._next_frames()
            if self._drop:
                cut = min(self._drop, pcm.shape[0])
                pcm, self._drop = pcm[cut:], self._drop - cut
            if self.end_frame is not None:
                pcm = pcm[: max(0, self.end_frame - self._timeline.pos)]
            if pcm.shape[0]:
                self._pacer.wait_for(pcm.shape[0])
                return self._timeline.block(np.ascontiguousarray(pcm))
            if self._eof or (self.end_frame is not None and self._timeline.pos >= self.end_frame):
                raise SourceExhausted(f"{self.description}: ended at frame {self._timeline.pos}")

    def _next_frames(self) -> Int16Frames:
        f = self._file
        if f is None:
            raise RuntimeError("read() before open()")
        if self._eof:
            return np.zeros((0, self.channels), dtype=np.int16)
        if self._exact:
            raw = f.read(self._chunk, dtype="int16", always_2d=True)
            if raw.shape[0] < self._chunk:
                self._eof = True
            return np.asarray(raw[:, : self.channels], dtype=np.int16)
        x = f.read(self._chunk, dtype="float32", always_2d=True)[:, : self.channels]
        if x.shape[0] < self._chunk:
            self._eof = True
        out = self._resampler.process(np.ascontiguousarray(x, dtype=np.float32))
        if self._eof:
            out = np.concatenate([out, self._resampler.flush()])
        return to_int16(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
