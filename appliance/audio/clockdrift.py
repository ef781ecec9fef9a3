"""Drift between the audio device's clock and the host's, and steps of the wall clock.

A block's capture time comes from its frame index anchored to the monotonic clock (see
:class:`appliance.audio.source.Timeline`), so recordings never reorder or overlap when NTP steps
the wall clock. What that choice hides is measured here, for telemetry and alarms:

- **device drift**: if the device's sample clock runs fast by ``e``, the frame-derived time runs
  ahead of the arrival time by ``e`` seconds per second. The lowest arrival lag in a window (the
  least-delayed block) is a low-jitter estimate of the true lag; the slope of that lowest lag
  between the first window after an anchor and the latest window is the drift, in ppm.
- **wall-clock step**: the wall clock minus the monotonic clock, now against the anchor; an NTP
  step shows as a jump of that difference.
"""

from __future__ import annotations

from dataclasses import dataclass

NS = 1_000_000_000
WINDOW_NS = 10 * NS
MIN_SPAN_NS = 30 * NS
DRIFT_ALARM_PPM = 500.0
WALL_STEP_ALARM_MS = 1000.0


@dataclass
class _Window:
    start: int
    min_lag: int


class DriftMeter:
    """Feed every block's (frame-derived end time, arrival time); read ``drift_ppm``."""

    def __init__(self) -> None:
        self._first: _Window | None = None
        self._first_done = False
        self._latest: _Window | None = None
        self._previous: _Window | None = None
        self.wall_step_ms = 0.0
        self._wall_minus_mono: int | None = None

    def reset(self) -> None:
        """After a gap the timeline re-anchors: start measuring again."""
        self._first, self._first_done, self._latest, self._previous = None, False, None, None

    def add(self, frame_end_mono_ns: int, arrival_mono_ns: int) -> None:
        lag = arrival_mono_ns - frame_end_mono_ns
        if self._first is None:
            self._first = _Window(arrival_mono_ns, lag)
            return
        if not self._first_done:
            if arrival_mono_ns - self._first.start < WINDOW_NS:
                self._first.min_lag = min(self._first.min_lag, lag)
                return
            self._first_done = True
        if self._latest is None or arrival_mono_ns - self._latest.start >= WINDOW_NS:
            self._previous = self._latest
            self._latest = _Window(arrival_mono_ns, lag)
        else:
            self._latest.min_lag = min(self._latest.min_lag, lag)

    @property
    def drift_ppm(self) -> float | None:
        """Device clock fast (+) or slow (-) against the host, once 30 s are measured."""
        last = self._previous or None
        if self._first is None or last is None:
            return None
        span = last.start - self._first.start
        if span < MIN_SPAN_NS:
            return None
        return -(last.min_lag - self._first.min_lag) / span * 1e6

    def wall_check(self, wall_ns: int, mono_ns: int, anchor_wall_ns: int,
                   anchor_mono_ns: int) -> float:
        """Milliseconds the wall clock moved against the monotonic one since the anchor."""
        self.wall_step_ms = ((wall_ns - mono_ns) - (anchor_wall_ns - anchor_mono_ns)) / 1e6
        return self.wall_step_ms
