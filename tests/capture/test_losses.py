"""Overruns and device loss, through the real libasound plus one test double.

The kernel cannot be made to overrun a file-backed PCM (its null slave never fills) or to
unplug it, so ``FlakyPCM`` wraps a real pyalsaaudio PCM and, at scripted reads, does what
pyalsaaudio does on a real device: ``read()`` returns ``(-EPIPE, b"")`` after an overrun, and
raises ``alsaaudio.ALSAAudioError("No such device [...]")`` once the device is gone (opening it
again raises until it is back). That object is the narrowest seam; everything else (libasound,
conversion, the capture loop, the ring journal) is real. A fake monotonic clock stands in for
the passing of time so the gap lengths are exact.
"""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path
from typing import Any

import alsaaudio
import numpy as np

from appliance.audio.alsa import AlsaSource
from appliance.buffer import Flags, RingReader, RingWriter
from appliance.capture import CaptureLoop
from appliance.config import CaptureSection
from tests.capture.conftest import sine_frames, write_raw

SEC = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 10 * SEC

    def __call__(self) -> int:
        return self.now


class FlakyPCM:
    """A real PCM whose read() follows a script: 'ok', 'xrun', or 'gone'."""

    def __init__(self, real: Any, owner: FlakyFactory) -> None:
        self.real = real
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def read(self) -> tuple[int, bytes]:
        o = self.owner
        o.reads += 1
        action = o.script.get(o.reads, "ok")
        if o.stop_after is not None and o.reads >= o.stop_after:
            o.stop.set()
        if action == "xrun":
            o.clock.now += o.xrun_stall_ns
            return -errno.EPIPE, b""
        if action == "gone":
            o.gone = o.reopen_failures
            raise alsaaudio.ALSAAudioError("No such device [filecap]")
        n, data = self.real.read()
        o.clock.now += n * SEC // o.rate  # a blocking read lasts one period
        return n, data


class FlakyFactory:
    def __init__(self, clock: FakeClock, rate: int, script: dict[int, str]) -> None:
        self.clock = clock
        self.rate = rate
        self.script = script
        self.reads = 0
        self.gone = 0
        self.reopen_failures = 0
        self.xrun_stall_ns = 0
        self.stop = threading.Event()
        self.stop_after: int | None = None

    def __call__(self, **kw: Any) -> Any:
        if self.gone:
            self.gone -= 1
            self.clock.now += SEC  # each failed attempt: one more second away
            raise alsaaudio.ALSAAudioError("No such file or directory [filecap]")
        return FlakyPCM(alsaaudio.PCM(**kw), self)


def test_overrun_becomes_a_gap_of_the_clock_measured_length(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "in.raw", sine_frames(2, 48000, 3.0), "S32_LE")
    clock = FakeClock()
    factory = FlakyFactory(clock, 48000, {5: "xrun"})
    factory.xrun_stall_ns = 1 * SEC  # the reader stalled for a second before the overrun
    src = AlsaSource(f"filecap:FILE={raw}", storage_rate=8000, channels=2, rate=48000,
                     sample_format="S32_LE", period_ms=20, pcm_factory=factory, clock=clock)
    src.open(100)
    blocks = []
    while factory.reads < 12:
        blocks.append(src.read())
    src.close()
    lost = [b for b in blocks if b.lost_frames]
    assert len(lost) == 1 and lost[0].xrun
    # Four periods of 960 device frames were read before the overrun, then 1 s passed:
    # the stream resumes where 4 * 960 + 48000 device frames put it at 8 kHz.
    assert lost[0].frame_pos == 100 + (4 * 960 + 48000) // 6
    before = [b for b in blocks if b.frame_pos < lost[0].frame_pos]
    end_before = before[-1].frame_pos + before[-1].frames
    assert lost[0].lost_frames == lost[0].frame_pos - end_before
    assert 7990 <= lost[0].lost_frames <= 8000  # minus what the resampler flushed
    for a, b in zip(blocks, blocks[1:], strict=False):
        assert b.frame_pos == a.frame_pos + a.frames + b.lost_frames
    # Times re-anchor at the overrun: the first frame after it was captured when it was seen.
    assert lost[0].mono_ns == 10 * SEC + 4 * 20_000_000 + 1 * SEC


def test_device_loss_is_retried_and_the_gap_recorded_in_the_journal(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "in.raw", sine_frames(2, 8000, 5.0), "S16_LE")
    clock = FakeClock()
    factory = FlakyFactory(clock, 8000, {6: "gone"})
    factory.reopen_failures = 2
    factory.stop_after = 14
    section = CaptureSection.model_validate({"device": f"filecap:FILE={raw}", "channels": 2,
                                             "rate": 8000, "sample_format": "S16_LE"})
    src = AlsaSource(section.device, storage_rate=8000, channels=2, rate=8000,
                     sample_format="S16_LE", pcm_factory=factory, clock=clock)
    ring = tmp_path / "main.ring"
    status = tmp_path / "capture-main.json"
    with RingWriter.open(ring, stream_id=1, size_bytes=1 << 20) as writer:
        loop = CaptureLoop(section, src, writer, status_path=status, clock=clock,
                           backoff_initial_s=0.001, backoff_cap_s=0.004)
        loop.run(factory.stop)
    reader = RingReader(ring)
    try:
        newest = reader.newest_seq()
        assert newest is not None
        records = [reader.get(s) for s in range(newest + 1)]
    finally:
        reader.close()
    assert all(r is not None for r in records)
    gaps = [r for r in records if r is not None and r.flags & Flags.GAP]
    assert len(gaps) == 1
    gap = gaps[0]
    assert not gap.flags & Flags.XRUN and gap.frames == 0
    # Lost after 5 reads of 160 frames; two failed reopens, one second each: 2 s at 8 kHz.
    assert gap.gap_frames == 16000
    assert gap.frame_pos == 5 * 160 + 16000
    pos = 0
    for r in records:
        assert r is not None
        assert r.frame_pos == pos + r.gap_frames
        pos = r.frame_pos + r.frames
    st = json.loads(status.read_text())
    assert st["device_losses"] == 1 and st["gaps"] == 1 and st["gap_frames"] == 16000
    assert st["alarms"] == [] and st["state"] == "stopped"
    # The audio after the gap is the file's continuation (the file plugin kept its place).
    data = np.frombuffer(b"".join(r.payload for r in records if r is not None), "<i2")
    assert data.size == 2 * sum(r.frames for r in records if r is not None)
