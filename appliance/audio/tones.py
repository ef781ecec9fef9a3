"""Call-progress tones (dial, ringback, busy, reorder) and the ring signal, by country preset.

Detection works like the DTMF receiver: hops of 25 ms on a grid fixed by the first sample, a
50 ms window made of two hops, one complex DFT sum per hop and frequency (one matrix product).
A window shows a *tone family* (a set of frequencies, e.g. 480+620 Hz) when every frequency of
the set is present and the set carries ``energy_ratio`` of the window's energy above
``min_level_dbfs``. The on/off runs of each family are measured in hops; a tone is recognised
when its last on/off durations match the preset's cadence (``cycles`` periods, each duration
within 20 % or 75 ms), or, for a continuous tone, when one on-run lasts ``continuous_s``. The
start of a recognised tone is the first on-run of the matched cadence, so the recorder can end a
call exactly where a busy tone began. Any chunking of the input gives the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.audio.dsp import FloatArray, db_to_amplitude, matmul_rows, pack_samples, unpack_samples
from linerec_contract.errors import ConfigError, FormatError

HOP_MS = 25
STATE_VERSION = 1
_TWO_PI = 2.0 * np.pi
_HISTORY = 8

DIAL = "dial"
RINGBACK = "ringback"
BUSY = "busy"
REORDER = "reorder"
RING = "ring"
"""The ringing voltage of an inbound call as a line tap hears it (20 or 25 Hz)."""


@dataclass(frozen=True)
class ToneSpec:
    kind: str
    freqs: tuple[float, ...]
    cadence: tuple[float, ...]
    """Seconds on, off, on, off...; empty for a continuous tone."""
    cycles: int = 2
    """Periods that must match before the tone is recognised."""


PRESETS: dict[str, tuple[ToneSpec, ...]] = {
    # North America: the Precise Tone Plan.
    "na": (
        ToneSpec(DIAL, (350.0, 440.0), ()),
        ToneSpec(RINGBACK, (440.0, 480.0), (2.0, 4.0), cycles=1),
        ToneSpec(BUSY, (480.0, 620.0), (0.5, 0.5)),
        ToneSpec(REORDER, (480.0, 620.0), (0.25, 0.25)),
        ToneSpec(RING, (20.0,), (2.0, 4.0), cycles=1),
    ),
    # United Kingdom (SIN 350).
    "uk": (
        ToneSpec(DIAL, (350.0, 450.0), ()),
        ToneSpec(RINGBACK, (400.0, 450.0), (0.4, 0.2, 0.4, 2.0), cycles=1),
        ToneSpec(BUSY, (400.0,), (0.375, 0.375)),
        ToneSpec(REORDER, (400.0,), (0.4, 0.35, 0.225, 0.525), cycles=1),
        ToneSpec(RING, (25.0,), (0.4, 0.2, 0.4, 2.0), cycles=1),
    ),
    # ETSI / CEPT recommendation (ETSI TR 101 041, ES 201 970).
    "etsi": (
        ToneSpec(DIAL, (425.0,), ()),
        ToneSpec(RINGBACK, (425.0,), (1.0, 4.0), cycles=1),
        ToneSpec(BUSY, (425.0,), (0.5, 0.5)),
        ToneSpec(REORDER, (425.0,), (0.25, 0.25)),
        ToneSpec(RING, (25.0,), (1.0, 4.0), cycles=1),
    ),
}
COUNTRIES = tuple(PRESETS)


@dataclass(frozen=True)
class ToneConfig:
    rate: int = 8000
    country: str = "etsi"
    min_level_dbfs: float = -45.0
    energy_ratio: float = 0.7
    continuous_s: float = 1.5
    tolerance: float = 0.2

    def __post_init__(self) -> None:
        if self.country not in PRESETS:
            raise ConfigError(f"tone country {self.country!r} is not known; accepted: "
                              f"{', '.join(COUNTRIES)}")
        if self.rate not in (8000, 16000):
            raise ConfigError(f"tone detector rate {self.rate} is not supported; accepted 8000, 16000")


@dataclass(frozen=True)
class ToneEvent:
    """``state`` "start": ``kind`` recognised at ``frame``, sounding since ``start``; "end":
    it stopped at ``frame`` (the end of its last on-run)."""

    kind: str
    state: str
    frame: int
    start: int


class _Family:
    """On/off runs of one set of frequencies."""

    def __init__(self, freqs: tuple[float, ...], specs: list[ToneSpec]) -> None:
        self.freqs = freqs
        self.specs = specs
        self.on = False
        self.length = 0  # hops in the current run
        self.run_start = 0  # hop where the current run began
        self.history: list[tuple[int, int]] = []  # completed runs: (start hop, hops), oldest first
        self.active: str | None = None
        self.active_start = 0  # hop
        self.last_on_end = 0  # hop after the last on-run

    def state(self) -> list[Any]:
        return [self.on, self.length, self.run_start, [list(h) for h in self.history], self.active,
                self.active_start, self.last_on_end]

    def restore(self, st: list[Any]) -> None:
        self.on, self.length, self.run_start = bool(st[0]), int(st[1]), int(st[2])
        self.history = [(int(a), int(b)) for a, b in st[3]]
        self.active = None if st[4] is None else str(st[4])
        self.active_start, self.last_on_end = int(st[5]), int(st[6])


class ToneDetector:
    """Streaming call-progress tone detector of one line (see the module docstring)."""

    def __init__(self, cfg: ToneConfig | None = None) -> None:
        self.cfg = cfg = cfg or ToneConfig()
        self._hop = cfg.rate * HOP_MS // 1000
        specs = PRESETS[cfg.country]
        by_freqs: dict[tuple[float, ...], list[ToneSpec]] = {}
        for spec in specs:
            by_freqs.setdefault(spec.freqs, []).append(spec)
        self._families = [_Family(f, s) for f, s in by_freqs.items()]
        self._freqs = np.array(sorted({f for spec in specs for f in spec.freqs}))
        self._cols = [np.searchsorted(self._freqs, fam.freqs) for fam in self._families]
        t = np.arange(self._hop, dtype=np.float64)
        phase = _TWO_PI * np.outer(t, self._freqs) / cfg.rate
        # Real basis (cosines, then sines): cheaper than a complex matrix product.
        self._basis = np.ascontiguousarray(np.concatenate((np.cos(phase), np.sin(phase)), axis=1))
        self._min_power = 10.0 ** (cfg.min_level_dbfs / 10.0)
        # A family is present only when each of its tones has min_power / len(freqs); a bin's
        # power is at most twice the window's mean-square power (before the DC is removed).
        self._gate_power = self._min_power / (2.0 * max(len(f.freqs) for f in self._families))
        self._origin: int | None = None
        self._next: int | None = None
        self._carry = np.zeros(0, dtype=np.int16)

    def sounding(self) -> list[tuple[str, int]]:
        """Recognised tones still sounding: (kind, start frame)."""
        return [(f.active, self._frame(f.active_start)) for f in self._families
                if f.active is not None]

    def _frame(self, hop: int) -> int:
        assert self._origin is not None
        return self._origin + hop * self._hop

    def process(self, start_frame: int, block: np.ndarray) -> list[ToneEvent]:
        if block.ndim != 1 or block.dtype != np.int16:
            raise ValueError(f"block of dtype {block.dtype} and shape {block.shape}; accepted 1-D int16")
        events: list[ToneEvent] = []
        if self._next is not None and start_frame != self._next:
            if start_frame < self._next:
                raise ValueError(f"block starts at {start_frame}, before {self._next}")
            events += self.flush()
            self._origin = None
        if self._origin is None:
            self._origin = start_frame
            self._carry = np.zeros(0, dtype=np.int16)
            for fam in self._families:
                fam.__init__(fam.freqs, fam.specs)  # type: ignore[misc]
        samples = np.concatenate((self._carry, block)) if self._carry.size else block
        self._next = start_frame + block.shape[0]
        base = self._next - samples.shape[0]
        hops = samples.shape[0] // self._hop
        self._carry = samples[max(0, hops - 1) * self._hop:].copy()
        if hops < 2:
            return events
        first = (base - self._origin) // self._hop  # window index of the first window here
        x = samples[: hops * self._hop].astype(np.float64) / 32768.0
        x = x.reshape(hops, self._hop)
        dc = x.sum(axis=1)
        energy = np.einsum("ij,ij->i", x, x)
        n = 2.0 * self._hop
        if not np.any(energy[:-1] + energy[1:] >= n * self._gate_power):
            # No family can be present in any window (idle line): skip the DFT.
            absent = np.zeros(hops - 1, dtype=bool)
            for fam in self._families:
                events += self._runs(fam, first, absent)
            return events
        m = matmul_rows(x, self._basis)
        s = m[:, :self._freqs.size] - 1j * m[:, self._freqs.size:]
        k = np.arange(first, first + hops, dtype=np.float64) * self._hop
        s *= np.exp(-1j * _TWO_PI * np.outer(k, self._freqs) / self.cfg.rate)
        w = s[:-1] + s[1:]
        power = 2.0 * (w.real**2 + w.imag**2) / (n * n)
        total = (energy[:-1] + energy[1:] - (dc[:-1] + dc[1:]) ** 2 / n) / n
        for fam, cols in zip(self._families, self._cols, strict=True):
            p = power[:, cols]
            tone = p.sum(axis=1)
            present = (
                (p.min(axis=1) >= self._min_power / len(cols))
                & (tone >= self.cfg.energy_ratio * total)
                & (p.min(axis=1) >= 0.1 * tone / len(cols))
            )
            events += self._runs(fam, first, present)
        return events

    def flush(self) -> list[ToneEvent]:
        out: list[ToneEvent] = []
        for fam in self._families:
            if fam.active is not None:
                end = fam.run_start if not fam.on else fam.run_start + fam.length
                out.append(ToneEvent(fam.active, "end", self._frame(max(end, fam.last_on_end)),
                                     self._frame(fam.active_start)))
                fam.active = None
        return out

    def _runs(self, fam: _Family, first: int, present: np.ndarray) -> list[ToneEvent]:
        events: list[ToneEvent] = []
        change = np.flatnonzero(np.diff(present.astype(np.int8))) + 1
        starts = np.concatenate(([0], change)).tolist()
        ends = np.concatenate((change, [present.size])).tolist()
        for st, en in zip(starts, ends, strict=True):
            on = bool(present[st])
            if on == fam.on:
                fam.length += en - st
            else:
                if fam.length:
                    fam.history.append((fam.run_start, fam.length))
                    del fam.history[:-_HISTORY]
                    if fam.on:
                        fam.last_on_end = fam.run_start + fam.length
                    else:
                        self._match(fam, events, first + st)
                fam.on, fam.length, fam.run_start = on, en - st, first + st
            self._check_end(fam, events, first + en)
            if fam.on and fam.active is None:
                self._match_continuous(fam, events, first + en)
        return events

    def _ms(self, hops: int) -> float:
        return hops * HOP_MS / 1000.0

    def _fits(self, measured: int, expected: float) -> bool:
        m = self._ms(measured)
        return abs(m - expected) <= max(self.cfg.tolerance * expected, 0.075)

    def _match(self, fam: _Family, events: list[ToneEvent], now: int) -> None:
        """An off-run just ended: does the history (ending with that off-run) match a cadence?"""
        if fam.active is not None:
            return
        runs = fam.history
        for spec in fam.specs:
            if not spec.cadence:
                continue
            need = len(spec.cadence) * spec.cycles
            if len(runs) < need:
                continue
            tail = runs[-need:]
            # The tail starts with an on-run when ``need`` is even (runs alternate, the last is off).
            for rot in range(0, len(spec.cadence), 2):
                pattern = (spec.cadence[rot:] + spec.cadence[:rot]) * spec.cycles
                if all(self._fits(h, p) for (_, h), p in zip(tail, pattern, strict=True)):
                    fam.active = spec.kind
                    fam.active_start = tail[0][0]
                    events.append(ToneEvent(spec.kind, "start", self._frame(now),
                                            self._frame(fam.active_start)))
                    return

    def _match_continuous(self, fam: _Family, events: list[ToneEvent], now: int) -> None:
        for spec in fam.specs:
            if not spec.cadence and self._ms(fam.length) >= self.cfg.continuous_s:
                fam.active = spec.kind
                fam.active_start = fam.run_start
                events.append(ToneEvent(spec.kind, "start", self._frame(now),
                                        self._frame(fam.run_start)))
                return

    def _check_end(self, fam: _Family, events: list[ToneEvent], now: int) -> None:
        if fam.active is None:
            return
        spec = next(s for s in fam.specs if s.kind == fam.active)
        if spec.cadence:
            max_on = max(spec.cadence[0::2]) * 1.5 + 0.1
            max_off = max(spec.cadence[1::2]) * 1.5 + 0.1
        else:
            max_on, max_off = float("inf"), 0.3
        too_long = self._ms(fam.length) > (max_on if fam.on else max_off)
        if too_long:
            end = fam.run_start if not fam.on else fam.run_start + fam.length
            events.append(ToneEvent(fam.active, "end", self._frame(end),
                                    self._frame(fam.active_start)))
            fam.active = None
            if fam.on:
                fam.history.clear()

    def to_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "origin": self._origin, "next": self._next,
                "carry": pack_samples(self._carry),
                "families": [f.state() for f in self._families]}

    @classmethod
    def from_state(cls, cfg: ToneConfig | None, state: dict[str, Any]) -> ToneDetector:
        det = cls(cfg)
        try:
            if state["version"] != STATE_VERSION:
                raise FormatError(f"tone state version {state['version']!r}; accepted {STATE_VERSION}")
            det._origin = None if state["origin"] is None else int(state["origin"])
            det._next = None if state["next"] is None else int(state["next"])
            det._carry = unpack_samples(state["carry"])
            if len(state["families"]) != len(det._families):
                raise FormatError("tone state was saved for another country preset")
            for fam, st in zip(det._families, state["families"], strict=True):
                fam.restore(st)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise FormatError(f"tone state is malformed: {err!r}") from err
        return det


def render(kind: str, country: str, seconds: float, rate: int = 8000, *,
           level_dbfs: float = -15.0) -> FloatArray:
    """``seconds`` of a preset's tone (each frequency at ``level_dbfs`` RMS), for tests."""
    spec = next((s for s in PRESETS[country] if s.kind == kind), None)
    if spec is None:
        raise ValueError(f"tone {kind!r} is not in preset {country!r}")
    n = np.arange(round(seconds * rate))
    amp = db_to_amplitude(level_dbfs) * np.sqrt(2.0)
    x = sum((amp * np.sin(_TWO_PI * f * n / rate) for f in spec.freqs), np.zeros(n.size))
    if spec.cadence:
        period = sum(spec.cadence)
        t = (n / rate) % period
        gate = np.zeros(n.size, dtype=bool)
        edge = 0.0
        for i, d in enumerate(spec.cadence):
            if i % 2 == 0:
                gate |= (t >= edge) & (t < edge + d)
            edge += d
        x = x * gate
    out: FloatArray = np.asarray(x, dtype=np.float64)
    return out
