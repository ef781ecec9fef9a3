"""Device clock drift and wall-clock steps are measured, and never move recordings."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.audio.clockdrift import NS, DriftMeter
from appliance.audio.source import Timeline

RATE = 8000
PERIOD = 160


def simulate(ppm: float, seconds: float, seed: int = 0) -> DriftMeter:
    """A device whose sample clock runs ``ppm`` fast delivers periods with random latency."""
    rng = np.random.default_rng(seed)
    meter = DriftMeter()
    periods = int(seconds * RATE / PERIOD)
    true_period_ns = PERIOD / RATE * NS / (1 + ppm * 1e-6)
    for k in range(1, periods + 1):
        frame_end = int(k * PERIOD * NS / RATE)           # frame-derived time (nominal rate)
        arrival = int(k * true_period_ns + 2_000_000 + rng.exponential(3_000_000))
        meter.add(frame_end, arrival)
    return meter


@pytest.mark.parametrize("ppm", [-300.0, -40.0, 0.0, 60.0, 800.0])
def test_drift_estimate(ppm: float) -> None:
    meter = simulate(ppm, 300.0)
    assert meter.drift_ppm is not None
    assert abs(meter.drift_ppm - ppm) < 10.0, meter.drift_ppm


def test_no_estimate_before_thirty_seconds() -> None:
    assert simulate(100.0, 20.0).drift_ppm is None


def test_reset_after_gap_starts_over() -> None:
    meter = simulate(100.0, 120.0)
    meter.reset()
    assert meter.drift_ppm is None


def test_wall_clock_step_does_not_reorder_capture_times() -> None:
    """NTP steps the wall clock back an hour mid-capture: frame times stay in order."""
    mono = [0]
    wall = [1_800_000_000 * NS]

    def mono_clock() -> int:
        return mono[0]

    def wall_clock() -> int:
        return wall[0]

    timeline = Timeline(RATE, clock=mono_clock, wall=wall_clock)
    timeline.start(0)
    meter = DriftMeter()
    last_wall = -1
    for k in range(200):
        mono[0] += PERIOD * NS // RATE
        wall[0] += PERIOD * NS // RATE
        if k == 100:
            wall[0] -= 3600 * NS
        blk = timeline.block(np.zeros((PERIOD, 1), dtype=np.int16))
        assert blk.wall_ns > last_wall
        last_wall = blk.wall_ns
        step = meter.wall_check(wall_clock(), mono_clock(), blk.wall_ns, blk.mono_ns)
    assert step == pytest.approx(-3600_000.0, abs=50.0)
