"""Caller ID on analog lines: Bell 202 and ETSI V.23 FSK (SDMF/MDMF), and DTMF caller ID.

FSK. Both standards send 1200 baud around 1700 Hz (Bell 202: mark 1200 Hz, space 2200 Hz; V.23:
mark 1300 Hz, space 2100 Hz), so one demodulator serves both: mix down by 1700 Hz, low-pass with
a one-bit boxcar, and take the phase advance per sample (negative = mark = 1). The deviation
tells the standard apart (+-500 Hz vs +-400 Hz). A burst is a stretch where the low-passed
baseband holds most of the signal's energy; it is decoded as asynchronous 8N1 characters after
the mark signal, then parsed as a message: type (0x04 SDMF, 0x80 MDMF call setup), length,
body, checksum (all bytes sum to 0 mod 256). MDMF parameters: 0x01 date and time (MMDDhhmm),
0x02 number, 0x04 reason for no number, 0x07 name, 0x08 reason for no name.

DTMF caller ID (ETSI EN 300 659-1 / ES 200 778-1 annex B and national variants): ``A``, ``B``
or ``D`` then the number or a withheld code, ended by ``C`` (or ``#``), sent before the first
ring or right after it; see :class:`DtmfCallerId`.

Everything here is numpy over the whole burst; Python loops run over characters only.
"""

from __future__ import annotations

import base64
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.audio.dsp import FloatArray, db_to_amplitude
from linerec_contract.errors import FormatError

BAUD = 1200
CENTER_HZ = 1700.0
STANDARDS = {"bell202": (1200.0, 2200.0), "v23": (1300.0, 2100.0)}
SDMF = 0x04
MDMF = 0x80
PARAM_NAMES = {0x01: "datetime", 0x02: "number", 0x04: "number_absent", 0x07: "name",
               0x08: "name_absent", 0x03: "dialled"}
MAX_BURST_S = 4.0
MIN_BURST_S = 0.1
GATE_HOP_S = 0.01
GATE_BAND_HZ = (900.0, 2400.0)
"""The pre-check's band: around both standards' mark and space (1200/2200, 1300/2100 Hz)."""
GATE_BAND_SHARE = 0.6
"""A hop is looked at when this share of its power is in the band (a burst holds >= 0.89 in
10 ms hops; speech and line noise rarely hold 0.6)..."""
GATE_MIN_POWER = 1e-5
"""...and its power is above -50 dBFS: 20 dB below the quietest burst to decode (-30 dBFS), and
above idle line noise."""
GATE_MARGIN_HOPS = 2
GATE_MIN_RUN_HOPS = 4
"""Shortest run of hops passing the band test that is searched for a burst (a burst of
MIN_BURST_S spans at least 9 whole hops)."""
"""Hops looked at on each side of a hop that passed (the finder's window is 44 samples)."""
STATE_VERSION = 1
_TWO_PI = 2.0 * np.pi


@dataclass(frozen=True)
class CallerId:
    """A decoded caller-ID message; ``frame`` is the line frame where its burst began."""

    frame: int
    source: str  # "bell202", "v23" or "dtmf"
    number: str | None = None
    name: str | None = None
    datetime: str | None = None
    absent: str | None = None
    """Why the number is missing: "P" private, "O" unavailable (as sent)."""
    fields: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        for key in ("number", "name", "datetime", "absent"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


# -- generation (tests, bench) -----------------------------------------------------------------

def build_message(number: str | None, name: str | None = None, datetime: str = "01011200",
                  *, sdmf: bool = False) -> bytes:
    """The bytes of an MDMF (or SDMF) message, checksum included."""
    if sdmf:
        body = (datetime + (number or "P")).encode("ascii")
        msg = bytes([SDMF, len(body)]) + body
    else:
        params = [(0x01, datetime)]
        params.append((0x02, number) if number else (0x04, "P"))
        if name is not None:
            params.append((0x07, name))
        body = b"".join(bytes([t, len(v)]) + v.encode("ascii") for t, v in params)
        msg = bytes([MDMF, len(body)]) + body
    return msg + bytes([-sum(msg) % 256])


def fsk(message: bytes, standard: str = "bell202", rate: int = 8000, *,
        level_dbfs: float = -15.0, seizure_bits: int = 300, mark_bits: int = 180) -> FloatArray:
    """Continuous-phase FSK of a caller-ID burst: seizure, mark signal, 8N1 characters."""
    mark, space = STANDARDS[standard]
    bits = [i % 2 for i in range(seizure_bits)] + [1] * mark_bits
    for byte in message:
        bits += [0] + [(byte >> i) & 1 for i in range(8)] + [1]
    bits += [1] * 10
    n = round(len(bits) * rate / BAUD)
    idx = np.minimum((np.arange(n) * BAUD) // rate, len(bits) - 1)
    freq = np.where(np.asarray(bits)[idx] == 1, mark, space)
    phase = _TWO_PI * np.cumsum(freq) / rate
    out: FloatArray = db_to_amplitude(level_dbfs) * np.sqrt(2.0) * np.sin(phase)
    return out


# -- demodulation ------------------------------------------------------------------------------

def _boxcar(x: np.ndarray, length: int) -> np.ndarray:
    c = np.cumsum(np.concatenate((np.zeros(1, dtype=x.dtype), x)))
    out: np.ndarray = (c[length:] - c[:-length]) / length
    return out


@functools.lru_cache(maxsize=4)
def _lowpass_taps(rate: int) -> FloatArray:
    """Windowed-sinc low-pass, cut-off 1000 Hz: passes the +-500 Hz baseband, stops the image
    at -2900 Hz (and, with the boxcar that follows, the carrier's double frequency)."""
    taps = 31 if rate <= 8000 else 61
    n = np.arange(taps) - (taps - 1) / 2.0
    h = np.sinc(2.0 * 1000.0 / rate * n) * np.hamming(taps)
    out: FloatArray = h / h.sum()
    out.flags.writeable = False  # shared by every call (cached)
    return out


def _baseband(x: FloatArray, rate: int, first: int = 0) -> tuple[np.ndarray, FloatArray]:
    """Low-passed complex baseband (``len(x) - taps + 1`` values) and its quality: the share of
    the signal's power that the baseband holds (about 1.0 for a clean FSK burst). ``first`` is
    the sample index of ``x[0]`` that the mixer's phase counts from."""
    h = _lowpass_taps(rate)
    n = np.arange(first, first + x.size)
    mixed = x * np.exp(-1j * _TWO_PI * CENTER_HZ * n / rate)
    bb = np.convolve(mixed, h, mode="valid")
    power = np.convolve(x * x, np.full(h.size, 1.0 / h.size), mode="valid")
    quality: FloatArray = 2.0 * (bb.real**2 + bb.imag**2) / np.maximum(power, 1e-12)
    return bb, quality


def demodulate(x: FloatArray, rate: int = 8000) -> tuple[list[int], str]:
    """Bytes of the 8N1 characters after the mark signal of one burst, and the standard."""
    bb, quality = _baseband(x, rate)
    if bb.size < 3:
        return [], "bell202"
    inst = np.angle(bb[1:] * np.conj(bb[:-1])) * rate / _TWO_PI  # Hz off the centre
    spb = rate / BAUD
    smooth = _boxcar(inst, max(1, round(spb / 2)))
    bits = (smooth < 0).astype(np.int8)  # below the centre: mark (1)
    strong = np.abs(bb[1:]) > 0.3 * float(np.max(np.abs(bb)))
    good = np.abs(inst[(quality[1:] > 0.8) & strong])
    dev = float(np.median(good)) if good.size else 0.0
    standard = "bell202" if dev > 450.0 else "v23"
    # The mark signal: the first run of >= 10 bit times of marks.
    need = round(10 * spb)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits, [0]))))
    runs = edges.reshape(-1, 2)
    long_marks = runs[(runs[:, 1] - runs[:, 0]) >= need]
    if long_marks.size == 0:
        return [], standard
    pos = float(long_marks[0, 0] + need)
    out: list[int] = []
    limit = bits.size
    while True:
        # Next start bit: the first space at or after pos.
        rest = np.flatnonzero(bits[int(pos):] == 0)
        if rest.size == 0:
            break
        start = int(pos) + int(rest[0])
        centres = start + (np.arange(1, 10) + 0.5) * spb
        if centres[-1] >= limit:
            break
        sampled = bits[np.rint(centres).astype(np.int64)]
        if sampled[-1] != 1:  # no stop bit: framing error, resync one bit later
            pos = start + spb
            continue
        out.append(int(sum(int(b) << i for i, b in enumerate(sampled[:8]))))
        pos = start + 9.5 * spb
    return out, standard


def parse_message(data: list[int] | bytes) -> dict[str, str] | None:
    """The fields of the first valid SDMF/MDMF message in ``data`` (checksum checked)."""
    raw = bytes(data)
    for i in range(len(raw) - 2):
        kind, length = raw[i], raw[i + 1]
        if kind not in (SDMF, MDMF) or i + 2 + length >= len(raw) + 0:
            continue
        msg = raw[i : i + 3 + length]
        if len(msg) != length + 3 or sum(msg) % 256 != 0:
            continue
        body = msg[2:-1]
        if kind == SDMF:
            text = body.decode("ascii", "replace")
            out = {"datetime": text[:8]}
            rest = text[8:]
            out["number_absent" if rest in ("P", "O") else "number"] = rest
            return out
        fields: dict[str, str] = {}
        j = 0
        while j + 2 <= len(body):
            tag, ln = body[j], body[j + 1]
            value = body[j + 2 : j + 2 + ln].decode("ascii", "replace")
            fields[PARAM_NAMES.get(tag, f"param_{tag:02x}")] = value
            j += 2 + ln
        if j == len(body):
            return fields
    return None


def decode_burst(x: FloatArray, rate: int = 8000, frame: int = 0) -> CallerId | None:
    data, standard = demodulate(x, rate)
    fields = parse_message(data)
    if fields is None:
        return None
    return CallerId(frame=frame, source=standard, number=fields.get("number"),
                    name=fields.get("name"), datetime=fields.get("datetime"),
                    absent=fields.get("number_absent"), fields=fields)


@functools.lru_cache(maxsize=4)
def _mixer(rate: int) -> tuple[FloatArray, FloatArray]:
    """One period of the 1700 Hz mixer (cos, sin): it repeats every rate / gcd(rate, 1700)
    samples, so the per-sample complex exponential is a table look-up."""
    period = rate // math.gcd(rate, round(CENTER_HZ))
    phase = _TWO_PI * CENTER_HZ * np.arange(period) / rate
    cos, sin = np.cos(phase), np.sin(phase)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


def _quality(x: FloatArray, rate: int) -> tuple[FloatArray, FloatArray]:
    """The quality of :func:`_baseband` (the share of the power in the low-passed baseband)
    and the mean-square power over the filter's length, for the burst search: real products
    and convolutions, a mixer table, and a running sum for the power."""
    h = _lowpass_taps(rate)
    cos, sin = _mixer(rate)
    reps = -(-x.size // cos.size)
    re = np.convolve(x * np.tile(cos, reps)[: x.size], h, mode="valid")
    im = np.convolve(x * np.tile(sin, reps)[: x.size], h, mode="valid")
    power = _boxcar(x * x, h.size)
    quality: FloatArray = 2.0 * (re * re + im * im) / np.maximum(power, 1e-12)
    return quality, power


class FskCallerIdReceiver:
    """Streaming: finds FSK bursts in a line's audio and decodes each when it ends."""

    def __init__(self, rate: int = 8000) -> None:
        self.rate = rate
        self._origin: int | None = None  # line frame of _buf[0]
        self._buf = np.zeros(0, dtype=np.int16)
        self._next: int | None = None

    def process(self, start_frame: int, block: np.ndarray) -> list[CallerId]:
        if self._next is not None and start_frame != self._next:
            self._buf = np.zeros(0, dtype=np.int16)
        if not self._buf.size:
            self._origin = start_frame
        self._next = start_frame + block.shape[0]
        buf = np.concatenate((self._buf, block)) if self._buf.size else block
        assert self._origin is not None
        origin = self._origin
        out: list[CallerId] = []
        x = buf.astype(np.float64) / 32768.0
        length = _lowpass_taps(self.rate).size
        min_len = round(MIN_BURST_S * self.rate)
        keep_from = max(0, buf.size - 4 * length)  # filter history for the next block
        if x.size > length:
            good = self._good(x, origin, length)
            edges = np.flatnonzero(np.diff(np.concatenate(([0], good.astype(np.int8), [0]))))
            for a, b in edges.reshape(-1, 2).tolist():
                if b >= good.size:  # still going at the end of the block
                    if b - a < MAX_BURST_S * self.rate:
                        keep_from = min(keep_from, a)
                    continue
                if b - a >= min_len:
                    cid = decode_burst(x[a : b + length], self.rate, origin + a)
                    if cid is not None:
                        out.append(cid)
        self._buf = buf[keep_from:].copy()
        self._origin = origin + keep_from
        return out

    def _good(self, x: FloatArray, origin: int, length: int) -> np.ndarray:
        """Where a burst may be: the boxcar'd baseband quality above 0.75 and the level above
        -60 dBFS. ``good[i]`` looks at ``x[i : i + length + 2 * spb - 1]``; it is computed only
        around the hops that pass :meth:`_gate`, and is False elsewhere."""
        q_len = 2 * round(self.rate / BAUD)
        span = length + q_len - 2  # samples that one value of ``good`` looks at, minus one
        good = np.zeros(max(0, x.size - span), dtype=bool)
        stretches = [(s, e) for s, e in self._gate(x, origin) if e - s > span]
        if not stretches:
            return good
        # One pass over the stretches' hull: each value depends on its own samples only, so
        # it equals the value computed on the stretch alone; only the stretches are kept.
        lo, hi = stretches[0][0], stretches[-1][1]
        quality, level = _quality(x[lo:hi], self.rate)
        quality = _boxcar(quality, q_len)
        found = (quality > 0.75) & (level[: quality.size] > 1e-6)
        for s, e in stretches:
            good[s : e - span] = found[s - lo : e - span - lo]
        return good

    def _gate(self, x: FloatArray, origin: int) -> list[tuple[int, int]]:
        """The stretches ``[s, e)`` of ``x`` that may hold FSK: hops (on the line's frame grid,
        ``x[0]`` being frame ``origin``) with enough of their power in the FSK band, widened by
        :data:`GATE_MARGIN_HOPS` on each side. The partial hops at both ends always count."""
        hop = round(GATE_HOP_S * self.rate)
        first = -origin % hop
        whole = max(0, (x.size - first) // hop)
        tail = first + whole * hop
        passed = np.ones(whole + 2, dtype=bool)  # [head partial, whole hops..., tail partial]
        passed[0], passed[-1] = first > 0, tail < x.size
        if whole:
            frames = x[first:tail].reshape(whole, hop)
            energy = np.einsum("ij,ij->i", frames, frames)
            loud = np.flatnonzero(energy > GATE_MIN_POWER * hop)  # only these need a spectrum
            passed[1:-1] = False
            if loud.size:
                spec = np.fft.rfft(frames[loud], axis=1)
                lo, hi = (round(f * hop / self.rate) for f in GATE_BAND_HZ)
                band = 2.0 * np.sum(spec.real[:, lo : hi + 1] ** 2 + spec.imag[:, lo : hi + 1] ** 2,
                                    axis=1) / hop
                passed[1 + loud] = band >= GATE_BAND_SHARE * energy[loud]
            # A burst lasts MIN_BURST_S (10 hops) with nearly all its power in the band: a run
            # of fewer than GATE_MIN_RUN_HOPS passing hops inside the buffer cannot be one
            # (speech passes the band test now and then, for a hop or two).
            runs = np.flatnonzero(np.diff(np.concatenate(([0], passed.astype(np.int8), [0]))))
            for a, b in runs.reshape(-1, 2).tolist():
                if b - a < GATE_MIN_RUN_HOPS and a > 1 and b < passed.size - 1:
                    passed[a:b] = False
        near = passed.copy()
        for d in range(1, GATE_MARGIN_HOPS + 1):
            near[d:] |= passed[:-d]
            near[:-d] |= passed[d:]
        bounds = np.concatenate(([0], first + hop * np.arange(whole + 1), [x.size]))
        edges = np.flatnonzero(np.diff(np.concatenate(([0], near.astype(np.int8), [0]))))
        return [(int(bounds[a]), int(bounds[b])) for a, b in edges.reshape(-1, 2).tolist()]

    def to_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "origin": self._origin, "next": self._next,
                "buf": base64.b64encode(self._buf.astype("<i2").tobytes()).decode("ascii")}

    @classmethod
    def from_state(cls, rate: int, state: dict[str, Any]) -> FskCallerIdReceiver:
        rx = cls(rate)
        try:
            if state["version"] != STATE_VERSION:
                raise FormatError(f"caller-ID state version {state['version']!r}")
            rx._origin = None if state["origin"] is None else int(state["origin"])
            rx._next = None if state["next"] is None else int(state["next"])
            raw = base64.b64decode(state["buf"])
            rx._buf = np.frombuffer(raw, dtype="<i2").astype(np.int16)
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"caller-ID state is malformed: {err!r}") from err
        return rx


Held = tuple[str, int, int]
"""A digit held back while a DTMF caller-ID message may be in progress: (digit, start, end)."""


class DtmfCallerId:
    """DTMF caller ID (ETSI EN 300 659-1 / ES 200 778-1 annex B and national variants).

    A message is a start digit, then digits, then a stop digit ``C`` (or ``#``):

    - ``A`` + number (most countries), ``B`` + number (variants that mark the number with B),
      ``D`` + number (variants that start with D, e.g. the Netherlands and Taiwan);
    - ``D`` + a code of one or two digits: the number is withheld (``1``/``10`` private,
      ``0``/``00``/``01`` unavailable);
    - several fields in one message (``A<number>D<code>C``, ``B<redirecting>A<number>C``): the
      ``A`` field is the number, else the first ``B``/``D`` number.

    Digits from a start digit on are *held*: they are not dialled digits unless the message
    fails (a gap of more than ``MAX_GAP_S`` between digits, a start digit that never reaches a
    stop digit, no number and no code, more than ``MAX_DIGITS`` digits); then they are
    *released* in order, with their own frames. Which digits are caller ID therefore depends on
    the digits and their frames only, not on call state or on how the audio was cut: a message
    sent before the first ring or in the first seconds of an inbound call goes to caller ID.
    """

    MAX_GAP_S = 1.0
    MAX_DIGITS = 24

    def __init__(self, rate: int = 8000) -> None:
        self.rate = rate
        self.held: list[Held] = []

    @property
    def last(self) -> int:
        return self.held[-1][2] if self.held else 0

    def feed(self, digit: str, start: int, end: int) -> CallerId | None:
        """The caller ID that ``digit`` completes, if any (released digits are dropped)."""
        cid, _ = self.feed_digit(digit, start, end)
        return cid

    def feed_digit(self, digit: str, start: int, end: int) -> tuple[CallerId | None, list[Held]]:
        """(caller ID completed by this digit, digits that turned out to be dialled digits)."""
        released = self.expire(start)
        if not self.held:
            if digit in "ABD":
                self.held = [(digit, start, end)]
                return None, released
            return None, [*released, (digit, start, end)]
        self.held.append((digit, start, end))
        if digit in "C#":
            msg, self.held = self.held, []
            cid = self._parse(msg)
            if cid is None:
                return None, released + msg
            return cid, released
        if len(self.held) > self.MAX_DIGITS:
            released += self.held
            self.held = []
        return None, released

    def expire(self, now: int) -> list[Held]:
        """Held digits whose message can no longer complete at frame ``now``."""
        if self.held and now - self.last > self.MAX_GAP_S * self.rate:
            out, self.held = self.held, []
            return out
        return []

    def _parse(self, msg: list[Held]) -> CallerId | None:
        fields: list[tuple[str, str]] = []
        for d, _, _ in msg[:-1]:
            if d in "ABD":
                fields.append((d, ""))
            elif d in "0123456789" and fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + d)
            else:
                return None  # a C or # inside, or a digit no caller ID uses
        frame = msg[0][1]
        numbers = {k: v for k, v in reversed(fields) if v and (k != "D" or len(v) > 2)}
        number = numbers.get("A") or numbers.get("B") or numbers.get("D")
        codes = [v for k, v in fields if k == "D" and 0 < len(v) <= 2]
        if number is not None:
            return CallerId(frame=frame, source="dtmf", number=number)
        if codes:
            return CallerId(frame=frame, source="dtmf", absent="P" if codes[0].startswith("1") else "O")
        return None

    def to_state(self) -> list[Any]:
        return [[d, s, e] for d, s, e in self.held]

    def restore(self, st: list[Any]) -> None:
        if st and not isinstance(st[0], list):  # an older checkpoint: [digits, start, last]
            self.held = []
            return
        self.held = [(str(d), int(s), int(e)) for d, s, e in st]
