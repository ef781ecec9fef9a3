"""Simulated phone lines as a capture source (the demo, the tests, a box with no hardware).

The simulation is a pure function of its settings and the frame index, so ``open(n)``
continues exactly at frame ``n``: a capture process restarted from its journal records the
very samples it would have recorded had it never stopped.
"""

from __future__ import annotations

import time

from appliance.audio.simulator import LineSimulator
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

FAST_CHUNK_S = 0.25
"""Without pacing, read this much per call: cheaper than one period at a time."""


class SimulatorSource(CaptureSource):
    """``LineSimulator`` at the storage rate; optionally paced like a device; optionally finite."""

    live = False

    def __init__(
        self, sim: LineSimulator, *, channels: int, period_ms: int = 20, realtime: bool = True,
        end_frame: int | None = None, clock: Clock | None = None,
    ) -> None:
        if not 1 <= channels <= sim.lines:
            raise ConfigError(f"channels {channels}: the simulator has lines 1..{sim.lines}")
        self.sim = sim
        self.channels = channels
        self.storage_rate = sim.rate
        self.end_frame = end_frame
        self.description = f"simulator ({sim.lines} lines, seed {sim.seed}, {sim.rate} Hz)"
        chunk = period_frames(sim.rate, period_ms)
        self._chunk = chunk if realtime else max(chunk, int(sim.rate * FAST_CHUNK_S))
        clock = clock or time.monotonic_ns
        self._timeline = Timeline(sim.rate, clock=clock)
        self._pacer = Pacer(sim.rate, enabled=realtime, clock=clock)
        self._open = False

    @classmethod
    def from_section(cls, section: CaptureSection) -> SimulatorSource:
        try:
            sim = LineSimulator(
                section.sim_lines, section.storage_rate, section.sim_seed,
                mean_idle_s=section.sim_mean_idle_s, mean_call_s=section.sim_mean_call_s,
                max_call_s=section.sim_max_call_s,
            )
        except ValueError as err:
            raise ConfigError(f"capture stream {section.name!r}: simulator: {err}") from err
        channels = selected_channels(section, section.sim_lines, "the simulator")
        end = round(section.stop_after_s * section.storage_rate) if section.stop_after_s else None
        return cls(sim, channels=channels, period_ms=section.period_ms,
                   realtime=section.realtime, end_frame=end)

    def open(self, start_frame: int) -> None:
        if start_frame < 0:
            raise ValueError(f"start_frame {start_frame} must be non-negative")
        self._timeline.start(start_frame)
        self._pacer.start()
        self._open = True

    def read(self) -> Block:
        if not self._open:
            raise RuntimeError("read() before open()")
        pos = self._timeline.pos
        n = self._chunk
        if self.end_frame is not None:
            n = min(n, self.end_frame - pos)
            if n <= 0:
                raise SourceExhausted(f"{self.description}: ended at frame {self.end_frame}")
        pcm = self.sim.render(pos, n)
        if self.channels != self.sim.lines:
            pcm = pcm[:, : self.channels].copy()
        self._pacer.wait_for(n)
        return self._timeline.block(pcm)

    def close(self) -> None:
        self._open = False
