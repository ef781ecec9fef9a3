"""A deterministic simulator of phone lines, for the demo and the tests.

Each line alternates idle periods (low line noise with a little mains hum) and calls. A call
starts with a few DTMF digits, then (after the far end answers) speech-like audio: noise shaped
by two formant-like resonances, amplitude-modulated at a syllable rate of 3-5 Hz, in talk spurts
of 1-4 s separated by pauses of 0.3-2.5 s; it ends with the last talk spurt (the hang-up).

:meth:`LineSimulator.render` is a pure function of the constructor arguments and the requested
span: audio is generated in fixed one-second blocks, each from random generators seeded by
(seed, line, block index), and each line's call schedule is generated lazily, in order, from a
generator seeded by (seed, line). So any chunking of a span renders the same bytes, and a test
can regenerate any span and compare it sample for sample with what came out of a pipeline.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from appliance.audio import dtmf
from appliance.audio.dsp import FloatArray, db_to_amplitude

# Tags that keep the random streams of one (seed, line) apart.
_TAG_SCHEDULE = 1
_TAG_NOISE = 2
_TAG_SPEECH = 3

NOISE_DBFS = -65.5
"""RMS level of the idle line's broadband noise (the hum adds up to about -65 dBFS)."""
HUM_DBFS = -75.0
HUM_HZ = 50
SPEECH_DBFS = -20.0
"""Average RMS level of a talk spurt (each spurt varies by up to +-3 dB)."""
MIN_IDLE_S = 6.0
MIN_CALL_S = 4.0
_RAMP_S = 0.01
_CACHE_PER_LINE = 3


@dataclass(frozen=True)
class SimCall:
    """Ground truth of one simulated call: frames [start_frame, end_frame) on ``line``.

    ``start_frame`` is the first sample of the first DTMF tone, ``end_frame`` the sample after
    the last talk spurt.
    """

    line: int
    start_frame: int
    end_frame: int
    digits: str


@dataclass(frozen=True)
class _Spurt:
    start: int
    end: int
    syllable_hz: float
    phase: float
    amplitude: float


@dataclass(frozen=True)
class _CallPlan:
    call: SimCall
    tone_starts: tuple[int, ...]
    spurts: tuple[_Spurt, ...]


class _LineSchedule:
    """The calls of one line, generated in order and only as far as asked."""

    def __init__(self, sim: LineSimulator, seed: int, line: int, first_call_s: float) -> None:
        self._sim = sim
        self._line = line
        self._rng = np.random.default_rng([seed, line, _TAG_SCHEDULE])
        jitter = float(self._rng.uniform(0.0, 1.0))
        self._next_start = max(0, round((first_call_s + jitter) * sim.rate))
        self.plans: list[_CallPlan] = []
        self._ends: list[int] = []

    def overlapping(self, start: int, end: int) -> list[_CallPlan]:
        while self._next_start < end:
            plan = self._plan_call(self._next_start)
            self.plans.append(plan)
            self._ends.append(plan.call.end_frame)
            gap_s = max(MIN_IDLE_S, float(self._rng.exponential(self._sim.mean_idle_s)))
            self._next_start = plan.call.end_frame + round(gap_s * self._sim.rate)
        # Calls do not overlap, so their ends are sorted: skip those that end by ``start``.
        i = bisect.bisect_right(self._ends, start)
        out: list[_CallPlan] = []
        for plan in self.plans[i:]:
            if plan.call.start_frame >= end:
                break
            out.append(plan)
        return out

    def _plan_call(self, start: int) -> _CallPlan:
        sim, rng, rate = self._sim, self._rng, self._sim.rate
        n_digits = int(rng.integers(3, 8))
        digits = "".join("0123456789*#"[int(i)] for i in rng.integers(0, 12, n_digits))
        step = sim.tone_frames + sim.pause_frames
        tone_starts = tuple(start + i * step for i in range(n_digits))
        target_s = float(np.clip(rng.exponential(sim.mean_call_s), MIN_CALL_S, sim.max_call_s))
        target_end = start + round(target_s * rate)
        latest_end = start + round(sim.max_call_s * rate)
        t = start + n_digits * step + round(float(rng.uniform(0.5, 2.0)) * rate)
        spurts: list[_Spurt] = []
        while True:
            end = min(t + round(float(rng.uniform(1.0, 4.0)) * rate), latest_end)
            level = SPEECH_DBFS + float(rng.uniform(-3.0, 3.0))
            # Mean square of the syllable envelope 0.35 + 0.65 * s, s = (1 - cos) / 2, is 0.508.
            amplitude = db_to_amplitude(level) / math.sqrt(0.508)
            spurt = _Spurt(
                t, end, float(rng.uniform(3.0, 5.0)), float(rng.uniform(0, 2 * np.pi)), amplitude
            )
            if end >= target_end:
                spurts.append(spurt)
                break
            t = end + round(float(rng.uniform(0.3, 2.5)) * rate)
            if t + rate // 2 > latest_end:
                # No room for another spurt: stretch this one to the call's target length.
                spurts.append(_Spurt(spurt.start, target_end, *_tail(spurt)))
                break
            spurts.append(spurt)
        call = SimCall(self._line, start, spurts[-1].end, digits)
        return _CallPlan(call, tone_starts, tuple(spurts))


def _tail(s: _Spurt) -> tuple[float, float, float]:
    return s.syllable_hz, s.phase, s.amplitude


class LineSimulator:
    """Simulated phone lines with a known call schedule (see the module docstring)."""

    def __init__(
        self,
        lines: int,
        rate: int = 8000,
        seed: int = 1,
        *,
        mean_idle_s: float = 8.0,
        mean_call_s: float = 20.0,
        max_call_s: float = 60.0,
        first_call_s: float = 1.0,
    ) -> None:
        if lines < 1:
            raise ValueError(f"lines {lines} must be at least 1")
        if rate < 4000:
            raise ValueError(f"rate {rate} must be at least 4000 Hz")
        if seed < 0:
            raise ValueError(f"seed {seed} must be non-negative")
        if mean_idle_s <= 0 or mean_call_s <= 0:
            raise ValueError("mean_idle_s and mean_call_s must be positive")
        if max_call_s < MIN_CALL_S:
            raise ValueError(f"max_call_s {max_call_s} must be at least {MIN_CALL_S}")
        if first_call_s < 0:
            raise ValueError(f"first_call_s {first_call_s} must be non-negative")
        self.lines = lines
        self.rate = rate
        self.seed = seed
        self.mean_idle_s = mean_idle_s
        self.mean_call_s = mean_call_s
        self.max_call_s = max_call_s
        self.block_frames = rate
        self.tone_frames = rate * dtmf.TONE_MS // 1000
        self.pause_frames = rate * dtmf.PAUSE_MS // 1000
        self._schedules = [_LineSchedule(self, seed, ln, first_call_s) for ln in range(lines)]
        # A block is one second, a whole number of hum periods: the hum is the same in each.
        hum_phase = 2.0 * np.pi * HUM_HZ * np.arange(self.block_frames) / rate
        self._hum = db_to_amplitude(HUM_DBFS) * math.sqrt(2.0) * np.sin(hum_phase)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def render(self, start_frame: int, frames: int) -> np.ndarray:
        """Audio of frames [start_frame, start_frame + frames): int16, shape (frames, lines)."""
        if start_frame < 0 or frames < 0:
            raise ValueError(f"span ({start_frame}, {frames}) must be non-negative")
        out = np.empty((frames, self.lines), dtype=np.int16)
        if frames == 0:
            return out
        b = self.block_frames
        end = start_frame + frames
        for line in range(self.lines):
            for block in range(start_frame // b, (end - 1) // b + 1):
                lo = max(start_frame, block * b)
                hi = min(end, (block + 1) * b)
                data = self._block(line, block)[lo - block * b : hi - block * b]
                out[lo - start_frame : hi - start_frame, line] = data
        return out

    def calls_between(self, start_frame: int, end_frame: int) -> list[SimCall]:
        """Ground-truth calls overlapping [start_frame, end_frame), by start frame then line."""
        calls = [
            p.call
            for sched in self._schedules
            for p in sched.overlapping(start_frame, end_frame)
        ]
        return sorted(calls, key=lambda c: (c.start_frame, c.line))

    def _block(self, line: int, block: int) -> np.ndarray:
        key = (line, block)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        data = self._render_block(line, block)
        self._cache[key] = data
        while len(self._cache) > _CACHE_PER_LINE * self.lines:
            self._cache.popitem(last=False)
        return data

    def _render_block(self, line: int, block: int) -> np.ndarray:
        rate, b = self.rate, self.block_frames
        a = block * b
        n = np.arange(a, a + b, dtype=np.int64)
        rng = np.random.default_rng([self.seed, line, block, _TAG_NOISE])
        x = rng.standard_normal(b) * db_to_amplitude(NOISE_DBFS)
        x += self._hum
        speech: FloatArray | None = None
        for plan in self._schedules[line].overlapping(a, a + b):
            for digit, ts in zip(plan.call.digits, plan.tone_starts, strict=True):
                lo, hi = max(ts, a), min(ts + self.tone_frames, a + b)
                if lo < hi:
                    x[lo - a : hi - a] += dtmf.tone(digit, hi - lo, rate, offset=lo - ts)
            for sp in plan.spurts:
                lo, hi = max(sp.start, a), min(sp.end, a + b)
                if lo >= hi:
                    continue
                if speech is None:
                    speech = self._speech_source(line, block)
                env = _envelope(sp, n[lo - a : hi - a], rate)
                x[lo - a : hi - a] += env * speech[lo - a : hi - a]
        pcm = np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)
        pcm.flags.writeable = False
        return pcm

    def _speech_source(self, line: int, block: int) -> FloatArray:
        """Unit-RMS noise shaped by a band-pass and two formant-like resonances."""
        rng = np.random.default_rng([self.seed, line, block, _TAG_SPEECH])
        white = rng.standard_normal(self.block_frames)
        f1 = float(rng.uniform(350.0, 900.0))
        f2 = float(rng.uniform(1100.0, 2400.0))
        freqs = np.fft.rfftfreq(self.block_frames, 1.0 / self.rate)
        shape = (
            1.0 / (1.0 + ((freqs - f1) / 120.0) ** 2)
            + 0.5 / (1.0 + ((freqs - f2) / 200.0) ** 2)
            + 0.03
        )
        shape[(freqs < 300.0) | (freqs > 3400.0)] = 0.0
        shaped = np.fft.irfft(np.fft.rfft(white) * shape, n=self.block_frames)
        rms = float(np.sqrt(np.mean(np.square(shaped))))
        out: FloatArray = shaped / rms
        return out


def _envelope(sp: _Spurt, n: np.ndarray, rate: int) -> FloatArray:
    """Syllable-rate envelope of a talk spurt at absolute sample indices ``n``."""
    t = (n - sp.start).astype(np.float64) / rate
    syllable = 0.35 + 0.65 * 0.5 * (1.0 - np.cos(2.0 * np.pi * sp.syllable_hz * t + sp.phase))
    ramp_len = _RAMP_S * rate
    ramp = np.minimum(1.0, np.minimum((n - sp.start + 1) / ramp_len, (sp.end - n) / ramp_len))
    out: FloatArray = sp.amplitude * syllable * ramp
    return out
