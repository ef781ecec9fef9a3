"""DTMF: tone generation (ITU-T Q.23) and a streaming receiver (ITU-T Q.24).

A digit is the sum of one row and one column frequency. Levels are per tone, RMS, in dBFS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.audio.dsp import FloatArray, db_to_amplitude, matmul_rows, pack_samples, unpack_samples
from linerec_contract.errors import ConfigError, FormatError

ROW_HZ: tuple[float, ...] = (697.0, 770.0, 852.0, 941.0)
COL_HZ: tuple[float, ...] = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD: tuple[str, ...] = ("123A", "456B", "789C", "*0#D")
DIGITS = "".join(KEYPAD)

TONE_MS = 70
PAUSE_MS = 70
LEVEL_DBFS = -10.0


def digit_freqs(digit: str) -> tuple[float, float]:
    """The (row, column) frequencies in Hz of a DTMF digit (0-9, *, #, A-D)."""
    d = digit.upper()
    for r, row in enumerate(KEYPAD):
        c = row.find(d)
        if c >= 0 and len(d) == 1:
            return ROW_HZ[r], COL_HZ[c]
    raise ValueError(f"DTMF digit {digit!r} is not valid; accepted: {DIGITS}")


def tone(
    digit: str, frames: int, rate: int = 8000, *, level_dbfs: float = LEVEL_DBFS, offset: int = 0
) -> FloatArray:
    """``frames`` samples (float, full scale 1.0) of ``digit``'s tone pair.

    ``offset`` is the index of the first returned sample within the tone, so a tone can be
    rendered in pieces that join seamlessly.
    """
    low, high = digit_freqs(digit)
    amp = db_to_amplitude(level_dbfs) * np.sqrt(2.0)
    n = np.arange(offset, offset + frames, dtype=np.float64)
    w = 2.0 * np.pi * n / rate
    out: FloatArray = amp * (np.sin(low * w) + np.sin(high * w))
    return out


def sequence(
    digits: str,
    rate: int = 8000,
    *,
    tone_ms: int = TONE_MS,
    pause_ms: int = PAUSE_MS,
    level_dbfs: float = LEVEL_DBFS,
) -> FloatArray:
    """A dialled string: each digit's tone for ``tone_ms`` followed by ``pause_ms`` of silence."""
    on = rate * tone_ms // 1000
    off = rate * pause_ms // 1000
    parts: list[FloatArray] = []
    for d in digits:
        parts.append(tone(d, on, rate, level_dbfs=level_dbfs))
        parts.append(np.zeros(off))
    return np.concatenate(parts) if parts else np.zeros(0)


# -- detection (ITU-T Q.24) --------------------------------------------------------------------
#
# The signal is cut into hops of 5 ms on a grid fixed by the first sample the detector sees. For
# every hop and every frequency of interest (8 DTMF tones and their second harmonics) one complex
# partial DFT sum is computed with a single matrix product; a 20 ms analysis window is the sum of
# four consecutive hops. Two windows one hop apart form a *pair*. The bins pick each pair's
# strongest row and column tone, and the phase advance between the windows gives a first
# estimate of their frequencies. On the few pairs where both tones stand out (``_measure``), the
# two tones and a constant are then fitted to the pair's 25 ms of samples by least squares,
# frequencies included (``fit_tone_pair``): with both tones in one model the stronger one no
# longer leaks into the weaker one's estimate, so each tone's frequency is known to within a
# hertz and its level to about 0.1 dB, at twists up to the limits. That separates a 1.5 % deviation
# (accepted) from a 3.5 % one (rejected), which a plain 20 ms Goertzel bin cannot, and puts the
# twist limits where they are configured. A pair is valid for a digit when, in both windows, one
# row and one column tone stand out from the other tones of their group, lie within the
# frequency tolerance, reach the minimum level, respect the twist limits, carry most of the
# window's energy and have no strong second harmonic (speech has). A digit is
# declared after ``on_pairs`` consecutive valid pairs and ends after ``off_pairs`` invalid ones,
# which realises the 40 ms minimum tone and pause. Only runs of equal pair results are visited
# in Python; everything per sample or per pair is numpy.

HOP_MS = 5
WINDOW_HOPS = 4
STATE_VERSION = 1
_TWO_PI = 2.0 * np.pi
_ALL_HZ = np.array(ROW_HZ + COL_HZ, dtype=np.float64)
_FREQS = np.concatenate((_ALL_HZ, 2.0 * _ALL_HZ))
_FIT_MARGIN = 0.015
"""Pairs whose first frequency estimate is within the tolerance plus this are fitted."""
_FIT_BAND = 0.05
"""The fit keeps each frequency within this of nominal (beyond any tolerance accepted)."""
_FIT_STEPS = 1
"""Gauss-Newton steps from the phase-advance estimate: one brings the frequencies to within
1 Hz (from up to 12 Hz off at 9 dB of twist) and the levels to within 0.1 dB."""


@dataclass(frozen=True)
class DtmfConfig:
    """Settings of the DTMF receiver; defaults follow ITU-T Q.24 (see docs/recorder.md)."""

    rate: int = 8000
    min_level_dbfs: float = -45.0
    """Each tone (RMS) must be at least this loud."""
    freq_tolerance_pct: float = 2.5
    """Accepted deviation of each tone: Q.24 asks to accept 1.5 % and reject 3.5 %."""
    twist_normal_db: float = 8.0
    """How much weaker the high-group tone may be than the low-group tone."""
    twist_reverse_db: float = 4.0
    """How much stronger the high-group tone may be than the low-group tone."""
    min_tone_ms: int = 40
    min_pause_ms: int = 40
    relative_peak_db: float = 8.0
    """Each tone must exceed the other tones of its group by this much."""
    energy_ratio: float = 0.75
    """The two tones must carry this fraction of the window's whole energy (talk-off)."""
    harmonic_db: float = 12.0
    """A tone's second harmonic must be this much weaker than the tone (talk-off)."""

    def __post_init__(self) -> None:
        checks = [
            (self.rate in (8000, 16000), "rate", "8000 or 16000"),
            (-80.0 <= self.min_level_dbfs <= -10.0, "min_level_dbfs", "-80..-10"),
            (0.5 <= self.freq_tolerance_pct <= 5.0, "freq_tolerance_pct", "0.5..5"),
            (0.0 <= self.twist_normal_db <= 20.0, "twist_normal_db", "0..20"),
            (0.0 <= self.twist_reverse_db <= 20.0, "twist_reverse_db", "0..20"),
            (30 <= self.min_tone_ms <= 200, "min_tone_ms", "30..200"),
            (20 <= self.min_pause_ms <= 200, "min_pause_ms", "20..200"),
            (3.0 <= self.relative_peak_db <= 20.0, "relative_peak_db", "3..20"),
            (0.3 <= self.energy_ratio <= 0.99, "energy_ratio", "0.3..0.99"),
            (3.0 <= self.harmonic_db <= 40.0, "harmonic_db", "3..40"),
        ]
        for ok, key, accepted in checks:
            if not ok:
                raise ConfigError(
                    f"DTMF setting {key}={getattr(self, key)!r} is out of range; accepted: {accepted}"
                )

    @property
    def hop(self) -> int:
        return self.rate * HOP_MS // 1000

    @property
    def on_pairs(self) -> int:
        """Consecutive valid pairs that make a digit (3 for 40 ms)."""
        return max(2, round((self.min_tone_ms - 25) / HOP_MS))

    @property
    def off_pairs(self) -> int:
        """Consecutive invalid pairs that end a digit (7 for 40 ms); a 10 ms break gives ~5."""
        return max(2, round((self.min_pause_ms + 20 - 15) / HOP_MS) - 2)


@dataclass(frozen=True)
class DtmfEvent:
    """A detected digit: line frames [start, end) (accurate to about one hop, 5 ms)."""

    digit: str
    start: int
    end: int
    quiet_dbfs: float = -120.0
    """Level of the quietest 20 ms window before the digit (for comfort noise)."""
    decided: int = 0
    """The first frame by which the receiver can know the digit is over (``end`` plus the
    pairs it waits for): until then a streaming receiver still counts it as sounding. A mask
    that runs to ``max(end, decided)`` is the same whatever the block sizes were."""


@dataclass(frozen=True)
class ToneMeasure:
    """A tone pair as the receiver measures it: frequencies (Hz) and levels (RMS, dBFS)."""

    digit: str
    row_hz: float
    col_hz: float
    row_dbfs: float
    col_dbfs: float

    @property
    def twist_db(self) -> float:
        """High-group (column) tone minus low-group (row) tone, in dB."""
        return self.col_dbfs - self.row_dbfs


class DtmfDetector:
    """Streaming DTMF receiver of one line; any chunking of the input gives the same events."""

    def __init__(self, cfg: DtmfConfig | None = None) -> None:
        self.cfg = cfg = cfg or DtmfConfig()
        self._hop = cfg.hop
        self._n = self._hop * WINDOW_HOPS
        t = np.arange(self._hop, dtype=np.float64)
        phase = _TWO_PI * np.outer(t, _FREQS) / cfg.rate
        # Real basis (cosines, then sines): a real matrix product is several times cheaper
        # than a complex one, and the partial DFT is cos part - 1j * sin part.
        self._basis = np.ascontiguousarray(np.concatenate((np.cos(phase), np.sin(phase)), axis=1))
        # No tone of a window reaches min_level when the window's mean-square power is below
        # this: a bin's power is at most twice the window's, and the window-gain correction
        # raises it at most 4 times. Blocks below it everywhere skip the DFT (idle lines).
        self._gate_power = 10.0 ** (cfg.min_level_dbfs / 10.0) / 8.0
        self._rot = _hop_rotations(self._hop, cfg.rate)
        self._min_power = 10.0 ** (cfg.min_level_dbfs / 10.0)
        self._normal = 10.0 ** (cfg.twist_normal_db / 10.0)
        self._reverse = 10.0 ** (cfg.twist_reverse_db / 10.0)
        self._rel = 10.0 ** (cfg.relative_peak_db / 10.0)
        self._harm = 10.0 ** (-cfg.harmonic_db / 10.0)
        # State (saved by to_state).
        self._origin: int | None = None  # frame of hop 0
        self._next: int | None = None
        self._carry = np.zeros(0, dtype=np.int16)  # the last WINDOW_HOPS hops + a partial hop
        self._run_digit = -1  # digit of the current run of equal pair results
        self._run_len = 0
        self._run_first = 0  # pair index where that run began
        self._active = -1  # confirmed digit still sounding
        self._active_start = 0
        self._active_last = 0  # pair index of the active digit's last valid pair
        self._quiet_power = 0.0  # lowest window power before the active (or last) digit
        self._last_quiet = 0.0  # lowest window power of the last finished run without a digit
        self._run_quiet = np.inf  # ... of the current run without a digit

    @property
    def active(self) -> tuple[str, int] | None:
        """The digit sounding now, once confirmed: (digit, start frame)."""
        if self._active < 0:
            return None
        return DIGITS_BY_INDEX[self._active], self._active_start

    @property
    def quiet_dbfs(self) -> float:
        """Level of the quietest 20 ms window in the last stretch without a digit."""
        return float(10.0 * np.log10(max(self._quiet_power, 1e-12)))

    def process(self, start_frame: int, block: np.ndarray) -> list[DtmfEvent]:
        """Feed 1-D int16 ``block`` whose first sample is line frame ``start_frame``."""
        if block.ndim != 1 or block.dtype != np.int16:
            raise ValueError(f"block of dtype {block.dtype} and shape {block.shape}; accepted 1-D int16")
        if self._next is not None and start_frame != self._next:
            if start_frame < self._next:
                raise ValueError(f"block starts at {start_frame}, before {self._next}")
            # A gap: restart the grid (an active digit ends where it was last heard).
            events = self.flush()
            self._origin = None
        else:
            events = []
        if self._origin is None:
            self._origin = start_frame
            self._carry = np.zeros(0, dtype=np.int16)
        samples = np.concatenate((self._carry, block)) if self._carry.size else block
        self._next = start_frame + block.shape[0]
        base = self._next - samples.shape[0]  # frame of samples[0], on the hop grid
        hops = samples.shape[0] // self._hop
        keep_from = max(0, hops - WINDOW_HOPS) * self._hop
        self._carry = samples[keep_from:].copy()
        if hops <= WINDOW_HOPS:
            return events
        first_hop = (base - self._origin) // self._hop
        x = samples[: hops * self._hop].astype(np.float64) / 32768.0
        events += self._pairs(first_hop, x.reshape(hops, self._hop))
        return events

    def flush(self) -> list[DtmfEvent]:
        """End an active digit (at a gap or the end of input)."""
        if self._active < 0:
            return []
        ev = self._event(self._active_last, decided=self._next)
        self._active = -1
        self._run_digit, self._run_len = -1, 0
        return [ev]

    def _frame(self, pair: int) -> int:
        assert self._origin is not None
        return self._origin + pair * self._hop

    def _event(self, last_pair: int, *, decided_pair: int | None = None,
               decided: int | None = None) -> DtmfEvent:
        end = self._frame(last_pair + 1) + self._n
        if decided_pair is not None:
            # Pair p needs the hops up to p + WINDOW_HOPS: its result exists from that frame on.
            decided = self._frame(decided_pair + WINDOW_HOPS + 1)
        return DtmfEvent(DIGITS_BY_INDEX[self._active], self._active_start, end, self.quiet_dbfs,
                         max(end, decided or end))

    def _pairs(self, first_hop: int, hops: np.ndarray) -> list[DtmfEvent]:
        energy = np.einsum("ij,ij->i", hops, hops)
        e = energy[0:-3] + energy[1:-2] + energy[2:-1] + energy[3:]
        n = float(self._n)
        total = e / n
        if not np.any(total >= self._gate_power):
            # Nothing in this block can be a digit: every pair is invalid.
            return self._runs(first_hop, np.full(total.size - 1, -1), total)
        m = matmul_rows(hops, self._basis)  # (h, 2F): cos and sin parts of each hop's sums
        f = _FREQS.size
        s = m[:, :f] - 1j * m[:, f:]  # (h, F) complex partial sums, phase relative to each hop start
        # Each hop's phase relative to hop 0 (a table: it repeats every _rot.shape[0] hops).
        s *= self._rot[np.arange(first_hop, first_hop + hops.shape[0]) % self._rot.shape[0]]
        w = s[0:-3] + s[1:-2] + s[2:-1] + s[3:]  # windows of WINDOW_HOPS hops
        power = 2.0 * (w.real**2 + w.imag**2) / (n * n)
        # A pair can only be valid where its strongest row and column bins, even after the
        # largest window-gain correction (4x), hold energy_ratio of the window's power; speech
        # rarely does, so the full tests run on the few candidate pairs only.
        peak = power[:, 0:4].max(axis=1) + power[:, 4:8].max(axis=1)
        tot = np.maximum(total[:-1], total[1:])
        cand = np.flatnonzero(4.0 * peak[:-1] >= self.cfg.energy_ratio * tot)
        digit = np.full(total.size - 1, -1)
        if cand.size:
            spans = hops[cand[:, None] + np.arange(WINDOW_HOPS + 1)].reshape(cand.size, -1)
            ok, which = self._valid(spans, w[cand], w[cand + 1], power[cand], power[cand + 1],
                                    total[cand], total[cand + 1])
            digit[cand] = np.where(ok, which, -1)
        # Pair p uses windows p and p+1; window 0 here is hop ``first_hop``.
        return self._runs(first_hop, digit, total)

    def _valid(self, spans: np.ndarray, wa: np.ndarray, wb: np.ndarray, a: np.ndarray,
               b: np.ndarray, ta: np.ndarray, tb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which pairs (samples ``spans``: the hops of both windows; window sums ``wa``,
        ``wb``; bin powers ``a``, ``b``; mean-square powers ``ta``, ``tb``) hold a valid
        digit, and which digit."""
        cfg = self.cfg
        r, c, k, hz, pw = self._measure(spans, wa, wb, a, b)
        ok = np.zeros(a.shape[0], dtype=bool)
        if k.size:
            nominal = np.stack((_ALL_HZ[r[k]], _ALL_HZ[c[k] + 4]), axis=1)
            tol = cfg.freq_tolerance_pct / 100.0
            in_tol = np.all(np.abs(hz - nominal) <= tol * nominal, axis=1)
            pr, pc = pw[:, 0], pw[:, 1]
            level = (pr >= self._min_power) & (pc >= self._min_power)
            twist = (pc <= pr * self._reverse) & (pr <= pc * self._normal)
            ratio = (pr + pc) >= cfg.energy_ratio * np.maximum(ta[k], tb[k])
            harm_r = np.maximum(a[k, r[k] + 8], b[k, r[k] + 8])
            harm_c = np.maximum(a[k, c[k] + 12], b[k, c[k] + 12])
            # A row tone's second harmonic bin lies within 100 Hz of some column tones (1394 Hz
            # vs 1336 Hz...): there it would measure the column tone, so it is only judged
            # elsewhere.
            judged = np.abs(2.0 * nominal[:, 0] - nominal[:, 1]) > 100.0
            harmonics = ((harm_r <= pr * self._harm) | ~judged) & (harm_c <= pc * self._harm)
            ok[k] = in_tol & level & twist & ratio & harmonics
        return ok, r * 4 + c

    def _measure(self, spans: np.ndarray, wa: np.ndarray, wb: np.ndarray, a: np.ndarray,
                 b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                         np.ndarray]:
        """Each pair's strongest row and column tones (indices ``r``, ``c``) and, for the pairs
        ``k`` where they are the strongest in both windows by ``relative_peak_db`` and near
        enough to nominal, their frequencies (Hz) and powers (mean square), jointly fitted."""
        rows_a, cols_a = a[:, 0:4], a[:, 4:8]
        rows_b, cols_b = b[:, 0:4], b[:, 4:8]
        r = np.argmax(rows_a, axis=1)
        c = np.argmax(cols_a, axis=1)
        idx = np.arange(a.shape[0])
        same = (r == np.argmax(rows_b, axis=1)) & (c == np.argmax(cols_b, axis=1))
        others_r = np.sort(np.maximum(rows_a, rows_b), axis=1)[:, -2]
        others_c = np.sort(np.maximum(cols_a, cols_b), axis=1)[:, -2]
        peak = (np.minimum(rows_a[idx, r], rows_b[idx, r]) >= others_r * self._rel) & (
            np.minimum(cols_a[idx, c], cols_b[idx, c]) >= others_c * self._rel
        )
        # A first estimate of each tone's frequency from the phase advance over one hop. The
        # stronger tone leaks into the weaker one's bin (moving it by several hertz near the
        # twist limits), so it only picks the pairs worth fitting and gives the fit its start.
        fr, fc = r, c + 4
        scale = self.cfg.rate / (_TWO_PI * self._hop)
        dev = np.stack((np.angle(wb[idx, fr] * np.conj(wa[idx, fr])),
                        np.angle(wb[idx, fc] * np.conj(wa[idx, fc]))), axis=1) * scale
        nominal = np.stack((_ALL_HZ[fr], _ALL_HZ[fc]), axis=1)
        loose = self.cfg.freq_tolerance_pct / 100.0 + _FIT_MARGIN
        k = np.flatnonzero(same & peak & np.all(np.abs(dev) <= loose * nominal, axis=1))
        if not k.size:
            return r, c, k, np.zeros((0, 2)), np.zeros((0, 2))
        hz, pw = fit_tone_pair(spans[k], nominal[k] + dev[k], nominal[k], self._n, self.cfg.rate)
        return r, c, k, hz, pw

    def measure(self, span: np.ndarray) -> ToneMeasure | None:
        """The tone pair in ``span`` as the receiver measures it when it judges a pair: int16
        samples of two windows one hop apart (25 ms). None when no row and column tone stand
        out in both windows near their nominal frequencies (nothing is fitted then)."""
        n = self._hop * (WINDOW_HOPS + 1)
        if span.ndim != 1 or span.dtype != np.int16 or span.shape[0] != n:
            raise ValueError(f"span of dtype {span.dtype} and shape {span.shape}; accepted {n} int16")
        hops = (span.astype(np.float64) / 32768.0).reshape(WINDOW_HOPS + 1, self._hop)
        m = hops @ self._basis
        f = _FREQS.size
        s = (m[:, :f] - 1j * m[:, f:]) * self._rot[np.arange(WINDOW_HOPS + 1) % self._rot.shape[0]]
        w = s[:-1].sum(axis=0), s[1:].sum(axis=0)
        power = [2.0 * np.abs(x) ** 2 / float(self._n) ** 2 for x in w]
        r, c, k, hz, pw = self._measure(hops.reshape(1, -1), w[0][None], w[1][None],
                                        power[0][None], power[1][None])
        if not k.size:
            return None
        lv = 10.0 * np.log10(np.maximum(pw[0], 1e-30))
        return ToneMeasure(DIGITS_BY_INDEX[int(r[0]) * 4 + int(c[0])], float(hz[0, 0]),
                           float(hz[0, 1]), float(lv[0]), float(lv[1]))

    def _runs(self, first_hop: int, digit: np.ndarray, total: np.ndarray) -> list[DtmfEvent]:
        events: list[DtmfEvent] = []
        if digit.size == 0:
            return events
        on, off = self.cfg.on_pairs, self.cfg.off_pairs
        change = np.flatnonzero(np.diff(digit)) + 1
        starts = np.concatenate(([0], change))
        ends = np.concatenate((change, [digit.size]))
        quiet = np.minimum.reduceat(total[: digit.size], starts)
        for st, en, q in zip(starts.tolist(), ends.tolist(), quiet.tolist(), strict=True):
            d = int(digit[st])
            p0, p1 = first_hop + st, first_hop + en  # pair indices [p0, p1)
            if d == self._run_digit:
                self._run_len += p1 - p0
            else:
                if self._run_digit < 0 and self._run_quiet != np.inf:
                    self._last_quiet = self._run_quiet
                self._run_digit, self._run_len, self._run_first = d, p1 - p0, p0
                self._run_quiet = np.inf
            if d < 0:
                self._run_quiet = min(self._run_quiet, q)
            if self._active >= 0 and d != self._active and p1 - 1 - self._active_last >= off:
                decided = self._active_last + off
                if d >= 0 and self._run_len >= on:  # another digit may have taken over first
                    decided = min(decided, self._run_first + on - 1)
                events.append(self._event(self._active_last, decided_pair=decided))
                self._active = -1
            if d < 0:
                continue
            if d == self._active:
                self._active_last = p1 - 1
            elif self._run_len >= on:
                if self._active >= 0:
                    events.append(self._event(self._active_last,
                                              decided_pair=self._run_first + on - 1))
                self._active = d
                self._active_start = self._frame(self._run_first)
                self._active_last = p1 - 1
                self._quiet_power = self._last_quiet
        return events

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "origin": self._origin,
            "next": self._next,
            "carry": pack_samples(self._carry),
            "run": [self._run_digit, self._run_len, self._run_first],
            "active": [self._active, self._active_start, self._active_last],
            "quiet": [self._quiet_power, self._last_quiet,
                      None if self._run_quiet == np.inf else self._run_quiet],
        }

    @classmethod
    def from_state(cls, cfg: DtmfConfig | None, state: dict[str, Any]) -> DtmfDetector:
        det = cls(cfg)
        try:
            if state["version"] != STATE_VERSION:
                raise FormatError(f"DTMF state version {state['version']!r}; accepted {STATE_VERSION}")
            det._origin = None if state["origin"] is None else int(state["origin"])
            det._next = None if state["next"] is None else int(state["next"])
            det._carry = unpack_samples(state["carry"])
            det._run_digit, det._run_len, det._run_first = (int(v) for v in state["run"])
            det._active, det._active_start, det._active_last = (int(v) for v in state["active"])
            det._quiet_power = float(state["quiet"][0])
            det._last_quiet = float(state["quiet"][1])
            det._run_quiet = np.inf if state["quiet"][2] is None else float(state["quiet"][2])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise FormatError(f"DTMF state is malformed: {err!r}") from err
        return det


DIGITS_BY_INDEX: tuple[str, ...] = tuple("".join(KEYPAD))


@functools.lru_cache(maxsize=4)
def _hop_rotations(hop: int, rate: int) -> np.ndarray:
    """exp(-2 pi i f k hop / rate) for every frequency f of interest and hop k over one
    period of hops (all frequencies are whole hertz, so the phases repeat)."""
    period = 1
    for f in _FREQS:
        q = rate // math.gcd(rate, round(f) * hop)
        period = period * q // math.gcd(period, q)
    k = np.arange(period, dtype=np.float64)[:, None]
    rot: np.ndarray = np.exp(-1j * _TWO_PI * ((k * hop * _FREQS) % rate) / rate)
    rot.flags.writeable = False
    return rot


def fit_tone_pair(x: np.ndarray, guess: np.ndarray, nominal: np.ndarray, window: int,
                  rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Both tones of each row of ``x`` (float samples of two windows of ``window`` samples
    that overlap, the second ending at the row's end), fitted jointly by least squares.

    The model is two sinusoids and a constant; the frequencies start at ``guess`` (Hz, one
    row per pair: row tone, column tone) and take ``_FIT_STEPS`` Gauss-Newton steps over the
    whole span, kept within ``_FIT_BAND`` of ``nominal``. With both tones in the model neither
    leaks into the other's estimate, whatever the twist. Returns the frequencies (Hz) and each
    tone's power (its mean square, full scale 1.0) at those frequencies, the smaller of the
    two windows', each window fitted on its own (a tone that fills only part of a window
    counts for that part, as in a DFT bin).

    Each row's result depends only on that row: cut invariance needs this.
    """
    k, n = x.shape
    hop = n - window
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    w = guess * (_TWO_PI / rate)
    lo = nominal * ((1.0 - _FIT_BAND) * _TWO_PI / rate)
    hi = nominal * ((1.0 + _FIT_BAND) * _TWO_PI / rate)
    basis = _tone_basis(w, hop, n // hop)  # (k, 5, n): cosines, sines, constant
    coef = _lstsq(basis, x)
    for _ in range(_FIT_STEPS):
        # Gauss-Newton on amplitudes and frequencies together; d model / d w = t (b cos - a sin)
        resid = x - (coef[:, :, None] * basis).sum(axis=1)
        dw = t * (coef[:, 2:4, None] * basis[:, 0:2] - coef[:, 0:2, None] * basis[:, 2:4])
        step = np.nan_to_num(_lstsq(np.concatenate((basis, dw), axis=1), resid))
        coef += step[:, :5]
        w = np.clip(w + step[:, 5:7], lo, hi)
        basis = _tone_basis(w, hop, n // hop)
    # Each window on its own, both in one solve.
    last = n - window
    coef = _lstsq(np.concatenate((basis[:, :, :window], basis[:, :, last:])),
                  np.concatenate((x[:, :window], x[:, last:])))
    power = (coef[:, 0:2] ** 2 + coef[:, 2:4] ** 2) / 2.0
    return w * (rate / _TWO_PI), np.minimum(power[:k], power[k:])


def _tone_basis(w: np.ndarray, hop: int, hops: int) -> np.ndarray:
    """cos(w t), sin(w t) for both tones and a constant, t in samples from the span's centre:
    (k, 5, hop * hops). exp(i w t) is built as exp(i w (hop start - centre)) exp(i w j), j
    within the hop, which takes far fewer cosines and sines."""
    k, n = w.shape[0], hop * hops
    centre = (n - 1) / 2.0
    ph_hop = w[:, :, None] * (np.arange(hops, dtype=np.float64) * hop - centre)
    ph_in = w[:, :, None] * np.arange(hop, dtype=np.float64)
    e = (np.cos(ph_hop) + 1j * np.sin(ph_hop))[:, :, :, None] * \
        (np.cos(ph_in) + 1j * np.sin(ph_in))[:, :, None, :]
    out = np.empty((k, 5, n))
    out[:, 0:2] = e.real.reshape(k, 2, n)
    out[:, 2:4] = e.imag.reshape(k, 2, n)
    out[:, 4] = 1.0
    return out


def _lstsq(basis: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of ``basis`` (k, m, n) for ``x`` (k, n), row by row
    (normal equations, slightly damped so that a vanished tone cannot make them singular)."""
    gram = basis @ basis.transpose(0, 2, 1)
    m = basis.shape[1]
    gram += np.eye(m) * (np.einsum("kii->ki", gram)[:, :, None] * 1e-12 + 1e-30)
    out: np.ndarray = np.linalg.solve(gram, basis @ x[:, :, None])[..., 0]
    return out


def detect(x: np.ndarray, rate: int = 8000, cfg: DtmfConfig | None = None) -> list[DtmfEvent]:
    """All digits of a whole int16 signal."""
    det = DtmfDetector(cfg or DtmfConfig(rate=rate))
    return det.process(0, x) + det.flush()
