"""The capture process: read the source, append to the ring journal. Nothing else.

Capture never waits on anything downstream. It only reads blocks (already int16 at the storage
rate) and appends them to its stream's journal as S16_LE records, splitting a block that does
not fit one slot. Frames that were not captured become an explicit gap record (Flags.GAP, plus
Flags.XRUN for an overrun) whose ``frame_pos`` is where audio resumes and whose ``gap_frames``
is the exact count lost, so frame positions stay contiguous for every reader.

Losses and where their length comes from:
- overrun: the source reports it (see ``appliance.audio.alsa``);
- device lost: retried with exponential backoff (capped); the gap is the monotonic time from
  the last audio read to the reopen, at the storage rate; an alarm is logged and kept in the
  status file while the device is away;
- capture process restarted with a live device: the time since the journal's newest record
  (monotonic clock when it is from this boot, wall clock otherwise). File and simulator
  sources continue exactly where the journal ends and lose nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance import sdnotify
from appliance.audio.clockdrift import DRIFT_ALARM_PPM, WALL_STEP_ALARM_MS, DriftMeter
from appliance.audio.source import (
    Block,
    CaptureSource,
    Clock,
    DeviceLost,
    SourceExhausted,
    open_source,
)
from appliance.buffer import Flags, Record, RingReader, RingWriter, SampleFormat
from appliance.config import CaptureSection, Config
from linerec_contract import durable
from linerec_contract.errors import ApplianceError

log = logging.getLogger(__name__)

MIB = 1 << 20
STATUS_INTERVAL_NS = 1_000_000_000
BACKOFF_INITIAL_S = 0.25
BACKOFF_CAP_S = 10.0
SAME_BOOT_TOLERANCE_NS = 2_000_000_000
SILENCE_DBFS = -120.0


def stream_id_of(name: str) -> int:
    """A stable journal stream id from the stream name (the order of streams may change)."""
    return zlib.crc32(name.encode())


def request_realtime(priority: int, what: str) -> bool:
    """Ask for SCHED_FIFO; one log line when the system does not allow it."""
    if priority <= 0:
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, OSError, AttributeError) as err:
        log.info("%s: real-time priority %d not allowed (%s); normal scheduling", what,
                 priority, getattr(err, "strerror", None) or err)
        return False
    log.info("%s: running with SCHED_FIFO priority %d", what, priority)
    return True


class LevelMeter:
    """Per-channel RMS and peak since the last snapshot (cheap: one pass over int16)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self._reset()

    def _reset(self) -> None:
        self._sumsq = np.zeros(self.channels, dtype=np.float64)
        self._peak = np.zeros(self.channels, dtype=np.int32)
        self._n = 0

    def add(self, pcm: npt.NDArray[np.int16]) -> None:
        if not pcm.shape[0]:
            return
        x = pcm.astype(np.float32)
        self._sumsq += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        self._peak = np.maximum(self._peak, np.abs(pcm.astype(np.int32)).max(axis=0))
        self._n += pcm.shape[0]

    def snapshot(self) -> list[tuple[float, float]]:
        """[(rms dBFS, peak dBFS)] per channel, then start a new interval."""
        out: list[tuple[float, float]] = []
        for ch in range(self.channels):
            rms = float(np.sqrt(self._sumsq[ch] / self._n)) if self._n else 0.0
            out.append((_dbfs(rms), _dbfs(float(self._peak[ch]))))
        self._reset()
        return out


def _dbfs(value: float) -> float:
    if value <= 0:
        return SILENCE_DBFS
    return round(max(SILENCE_DBFS, 20.0 * float(np.log10(value / 32768.0))), 1)


@dataclass
class CaptureStats:
    frames: int = 0
    records: int = 0
    xruns: int = 0
    gaps: int = 0
    gap_frames: int = 0
    device_losses: int = 0
    alarms: dict[str, dict[str, Any]] = field(default_factory=dict)


def resume_point(path: Path) -> Record | None:
    """The journal's newest record (capture continues after it), None for an empty journal."""
    reader = RingReader(path)
    try:
        seq = reader.newest_seq()
        return None if seq is None else reader.get(seq)
    finally:
        reader.close()


def downtime_frames(rec: Record, *, rate: int, mono_now: int, wall_now: int) -> int:
    """Frames a live device produced between the end of ``rec`` and now."""
    span = rec.frames * 1_000_000_000 // max(1, rec.rate)
    by_mono = mono_now - (rec.mono_ns + span)
    by_wall = wall_now - (rec.wall_ns + span)
    # Monotonic time is only comparable within one boot: trust it when both clocks agree.
    elapsed = by_mono if abs(by_mono - by_wall) < SAME_BOOT_TOLERANCE_NS else by_wall
    return max(0, elapsed * rate // 1_000_000_000)


class CaptureLoop:
    """Reads one source and appends to one journal until stopped or the source ends."""

    def __init__(
        self, stream: CaptureSection, source: CaptureSource, writer: RingWriter, *,
        status_path: Path | None, single_stream: bool = True, next_pos: int = 0,
        clock: Clock = time.monotonic_ns, wall: Clock = time.time_ns,
        backoff_initial_s: float = BACKOFF_INITIAL_S, backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        self.stream = stream
        self.source = source
        self.writer = writer
        self.status_path = status_path
        self.single_stream = single_stream
        self.clock = clock
        self.wall = wall
        self.backoff_initial_s = backoff_initial_s
        self.backoff_cap_s = backoff_cap_s
        self.rate = source.storage_rate
        self.stats = CaptureStats()
        self.next_pos = next_pos
        """Frame after the last one in the journal."""
        self.state = "starting"
        self._meter: LevelMeter | None = None
        self._last_status = 0
        self._device_error = ""
        self.drift = DriftMeter()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, start_frame: int | None = None) -> None:
        """Capture until ``stop`` is set or a finite source ends.

        The source starts at ``start_frame`` (default: right after the journal's end); frames
        between the journal's end and it are recorded as a gap.
        """
        if start_frame is None:
            start_frame = self.next_pos
        notifier = sdnotify.notifier()
        try:
            self._open(start_frame, stop)
            while not stop.is_set():
                notifier.watchdog()  # a read stuck in the driver stops the keep-alives
                try:
                    blk = self.source.read()
                except SourceExhausted as end:
                    log.info("stream %s: %s", self.stream.name, end)
                    self.state = "finished"
                    break
                except DeviceLost as err:
                    self._device_lost(err, stop)
                    continue
                self.append(blk)
                self._maybe_status()
            else:
                tail = self.source.finish() if self.state == "running" else None
                if tail is not None:
                    self.append(tail)
                self.state = "stopped"
        except ApplianceError as err:
            self.state = "failed"
            self._device_error = str(err)
            raise
        finally:
            self.source.close()
            self.writer.sync()
            self._write_status()

    def _open(self, start_frame: int, stop: threading.Event) -> None:
        try:
            self.source.open(start_frame)
        except DeviceLost as err:
            # A device missing at start is treated like one lost at the start frame.
            self._device_lost(DeviceLost(str(err), at_mono_ns=self.clock()), stop,
                              already_closed=True, gap_from=start_frame)
            return
        self.state = "running"

    def _device_lost(self, err: DeviceLost, stop: threading.Event, *,
                     already_closed: bool = False, gap_from: int | None = None) -> None:
        """Retry with backoff until the device is back (or stop); the gap follows on return."""
        lost_at = err.at_mono_ns if err.at_mono_ns is not None else self.clock()
        base = self.next_pos if gap_from is None else gap_from
        self.stats.device_losses += 1
        self.state = "device_lost"
        self._device_error = str(err)
        self._raise_alarm("device_lost", str(err))
        if not already_closed:
            self.source.close()
        delay = self.backoff_initial_s
        notifier = sdnotify.notifier()
        while not stop.is_set():
            self._write_status()
            retry_at = time.monotonic() + delay
            while not stop.is_set() and time.monotonic() < retry_at:
                notifier.watchdog()  # waiting for the device is this loop's work
                stop.wait(notifier.max_wait(retry_at - time.monotonic()))
            if stop.is_set():
                return
            gap = max(0, (self.clock() - lost_at) * self.rate // 1_000_000_000)
            try:
                self.source.open(base + gap)
            except DeviceLost as again:
                self._device_error = str(again)
                log.debug("stream %s: device still away: %s", self.stream.name, again)
                delay = min(delay * 2, self.backoff_cap_s)
                continue
            log.warning("stream %s: device back after %d frames (%.3f s)", self.stream.name,
                        gap, gap / self.rate)
            self.state = "running"
            self._device_error = ""
            self._clear_alarm("device_lost")
            return

    # -- journal ----------------------------------------------------------------------------

    def append(self, blk: Block) -> None:
        """Append ``blk`` (and the gap before it) to the journal."""
        pcm = blk.pcm
        if pcm.ndim != 2 or pcm.dtype != np.int16:
            raise TypeError(f"block must be int16 (frames, channels), got {pcm.dtype} {pcm.shape}")
        channels = int(pcm.shape[1])
        if self._meter is None or self._meter.channels != channels:
            self._meter = LevelMeter(channels)
        if blk.frame_pos < self.next_pos:
            raise RuntimeError(f"stream {self.stream.name}: source went back from frame "
                               f"{self.next_pos} to {blk.frame_pos}")
        if blk.frame_pos > self.next_pos or blk.xrun:
            self._append_gap(blk, channels)
            self.drift.reset()
        n = int(pcm.shape[0])
        if self.source.live and n:
            self._measure_clocks(blk, n)
        per_record = max(1, self.writer.max_payload // (2 * channels))
        data = pcm.astype("<i2", copy=False)
        for off in range(0, n, per_record):
            chunk = data[off:off + per_record]
            delta = off * 1_000_000_000 // self.rate
            self.writer.append(
                chunk.tobytes(), frames=int(chunk.shape[0]), channels=channels, rate=self.rate,
                sample_format=SampleFormat.S16_LE, frame_pos=blk.frame_pos + off,
                mono_ns=blk.mono_ns + delta, wall_ns=blk.wall_ns + delta,
            )
            self.stats.records += 1
        self.next_pos = blk.frame_pos + n
        self.stats.frames += n
        self._meter.add(pcm)

    def _append_gap(self, blk: Block, channels: int) -> None:
        lost = blk.frame_pos - self.next_pos
        flags = Flags.GAP | (Flags.XRUN if blk.xrun else Flags.NONE)
        self.writer.append(
            b"", frames=0, channels=channels, rate=self.rate, sample_format=SampleFormat.S16_LE,
            frame_pos=blk.frame_pos, flags=flags, gap_frames=lost, mono_ns=blk.mono_ns,
            wall_ns=blk.wall_ns,
        )
        self.stats.records += 1
        self.stats.gaps += 1
        self.stats.gap_frames += lost
        if blk.xrun:
            self.stats.xruns += 1
        log.warning("stream %s: gap of %d frames (%.3f s) before frame %d%s", self.stream.name,
                    lost, lost / self.rate, blk.frame_pos, " (overrun)" if blk.xrun else "")

    def _measure_clocks(self, blk: Block, frames: int) -> None:
        now = self.clock()
        self.drift.add(blk.mono_ns + frames * 1_000_000_000 // self.rate, now)
        step = self.drift.wall_check(self.wall(), now, blk.wall_ns, blk.mono_ns)
        drift = self.drift.drift_ppm
        if drift is not None and abs(drift) > DRIFT_ALARM_PPM:
            self._raise_alarm("clock_drift", f"device clock off by {drift:+.0f} ppm")
        elif drift is not None:
            self._clear_alarm("clock_drift")
        if abs(step) > WALL_STEP_ALARM_MS:
            # Recordings keep their frame-derived times; only the report says the clock moved.
            self._raise_alarm("wall_clock_step", f"wall clock moved {step:+.0f} ms against "
                              "the monotonic clock since capture anchored")

    # -- status -----------------------------------------------------------------------------

    def _raise_alarm(self, name: str, message: str) -> None:
        if name not in self.stats.alarms:
            log.error("stream %s: ALARM %s: %s", self.stream.name, name, message)
            self.stats.alarms[name] = {"since": time.time(), "message": message}
        else:
            self.stats.alarms[name]["message"] = message

    def _clear_alarm(self, name: str) -> None:
        if self.stats.alarms.pop(name, None) is not None:
            log.warning("stream %s: alarm %s cleared", self.stream.name, name)

    def _maybe_status(self) -> None:
        now = self.clock()
        if now - self._last_status >= STATUS_INTERVAL_NS:
            self._last_status = now
            self._write_status()

    def status(self) -> dict[str, Any]:
        levels = self._meter.snapshot() if self._meter is not None else []
        ids = self.stream.line_ids(len(levels), single_stream=self.single_stream)
        lines = [
            {"line": ids[i] if i < len(ids) else f"ch{i + 1}", "channel": i + 1,
             "level_dbfs": rms, "peak_dbfs": peak}
            for i, (rms, peak) in enumerate(levels)
        ]
        return {
            "version": 1,
            "ts": time.time(),
            "pid": os.getpid(),
            "stream": self.stream.name,
            "state": self.state,
            "source": self.source.description,
            "device": {"state": "lost" if self.state == "device_lost" else
                       ("failed" if self.state == "failed" else "ok"),
                       "error": self._device_error},
            "rate": self.rate,
            "frame_pos": self.next_pos,
            "frames_captured": self.stats.frames,
            "records": self.stats.records,
            "xruns": self.stats.xruns,
            "gaps": self.stats.gaps,
            "gap_frames": self.stats.gap_frames,
            "device_losses": self.stats.device_losses,
            "alarms": [{"alarm": k, **v} for k, v in sorted(self.stats.alarms.items())],
            "clock": {"device_drift_ppm": self.drift.drift_ppm,
                      "wall_step_ms": round(self.drift.wall_step_ms, 3)},
            "lines": lines,
        }

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            durable.write_status(self.status_path, self.status())
        except OSError as err:  # advisory: never let a status file stop capture
            log.warning("stream %s: status file %s: %s", self.stream.name, self.status_path, err)


def run_capture(
    cfg: Config, stream: CaptureSection, stop: threading.Event, *,
    source: CaptureSource | None = None, clock: Clock = time.monotonic_ns,
) -> None:
    """The capture process body for one stream (see the module docstring).

    ``source`` and ``clock`` replace the configured source and the monotonic clock (tests).
    """
    src = source if source is not None else open_source(stream)
    if src.live or stream.realtime:
        request_realtime(stream.rt_priority, f"capture {stream.name}")
    path = cfg.ring_path(stream.name)
    durable.ensure_dir(path.parent)
    durable.ensure_dir(cfg.run_dir)
    writer = RingWriter.open(
        path, stream_id=stream_id_of(stream.name), size_bytes=cfg.ring.size_mb * MIB,
        slot_size=cfg.ring.slot_size, sync_interval_s=cfg.ring.sync_interval_ms / 1000.0,
    )
    try:
        if writer.recovery_note:
            log.warning("stream %s: journal recovered: %s", stream.name, writer.recovery_note)
        newest = resume_point(path)
        end = 0 if newest is None else newest.frame_pos + newest.frames
        start = end
        if newest is not None and src.live:
            # The device kept producing while nobody read it: that time is lost.
            start += downtime_frames(newest, rate=stream.storage_rate, mono_now=clock(),
                                     wall_now=time.time_ns())
        log.info("stream %s: capturing %s from frame %d into %s", stream.name,
                 src.description, start, path)
        loop = CaptureLoop(
            stream, src, writer, status_path=cfg.run_dir / f"capture-{stream.name}.json",
            single_stream=len(cfg.capture) == 1, next_pos=end, clock=clock,
        )
        loop.run(stop, start_frame=start)
    finally:
        writer.close()
