"""DTMF receiver against ITU-T Q.24 and the configured limits, digit by digit.

Every digit at both twist limits (0.3 dB inside: accepted; 1 dB outside: rejected), at both
frequency offsets Q.24 names (1.5 %: accepted; 3.5 %: rejected), with the weaker tone just
above the configured minimum level. The tones are synthesised here from the Q.23 frequency
table (not with the module's own generator), and the expected outcome is the limit itself.

The measurement behind those decisions is checked on its own: the twist, levels and
frequencies the receiver measures of every digit, at both twist limits, from the minimum level
to the loudest that does not clip, at 0 and +-1.5 % offset, against the values the signal was
synthesised with.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from appliance.audio.dtmf import WINDOW_HOPS, DtmfConfig, DtmfDetector, detect

RATE = 8000
CFG = DtmfConfig()
KEYS = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
        "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
        "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
        "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633)}
# Twist in dB = level of the high-group tone minus the low-group tone (Q.24: "normal" twist
# has the high group weaker, "reverse" twist has it stronger).
TWISTS_INSIDE = (-(CFG.twist_normal_db - 0.3), CFG.twist_reverse_db - 0.3)
TWISTS_OUTSIDE = (-(CFG.twist_normal_db + 1.0), CFG.twist_reverse_db + 1.0)
LEVEL_ABOVE_MIN_DB = 1.0


def levels(twist_db: float, weaker_dbfs: float) -> tuple[float, float]:
    """(low-group, high-group) tone levels in dBFS for a twist and the weaker tone's level."""
    if twist_db < 0:
        return weaker_dbfs - twist_db, weaker_dbfs
    return weaker_dbfs, weaker_dbfs + twist_db


def tone_pair(digit: str, twist_db: float, offset: float, weaker_dbfs: float, *,
              tone_ms: int = 60, pad_ms: int = 100, seed: int = 0, shift: int = 0,
              phases: tuple[float, float] = (0.3, 1.1)) -> np.ndarray:
    """Silence (``shift`` samples more before the tone), the digit (both tones ``offset`` off
    nominal), silence; int16 with -75 dBFS noise."""
    low, high = KEYS[digit]
    lo_db, hi_db = levels(twist_db, weaker_dbfs)
    n = np.arange(tone_ms * RATE // 1000)
    tone = sum(math.sqrt(2.0) * 10 ** (db / 20) * np.sin(2 * np.pi * f * (1 + offset) * n / RATE + ph)
               for f, db, ph in ((low, lo_db, phases[0]), (high, hi_db, phases[1])))
    pad = np.zeros(RATE * pad_ms // 1000)
    x = np.concatenate((pad, np.zeros(shift), tone, pad))
    x = x + np.random.default_rng(seed).standard_normal(x.size) * 10 ** (-75 / 20)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def signal(digit: str, twist_db: float, offset: float, *, tone_ms: int = 60,
           seed: int = 0) -> np.ndarray:
    """Silence, the digit (weaker tone at the minimum level + 1 dB), silence; int16."""
    return tone_pair(digit, twist_db, offset, CFG.min_level_dbfs + LEVEL_ABOVE_MIN_DB,
                     tone_ms=tone_ms, seed=seed)


def loudest_weaker_dbfs(twist_db: float) -> float:
    """The weaker tone's level at which the two tones together peak at -0.5 dBFS."""
    peak = 10 ** (-0.5 / 20)
    return 20 * math.log10(peak / (math.sqrt(2.0) * (1.0 + 10 ** (abs(twist_db) / 20))))


def digits_of(x: np.ndarray) -> str:
    return "".join(e.digit for e in detect(x, RATE, CFG))


@pytest.mark.parametrize("digit", list(KEYS))
def test_accepted_at_1_5_percent_at_the_minimum_level(digit: str) -> None:
    for offset in (-0.015, 0.015):
        assert digits_of(signal(digit, 0.0, offset)) == digit, offset


@pytest.mark.parametrize("digit", list(KEYS))
def test_accepted_at_the_twist_limits_and_1_5_percent(digit: str) -> None:
    for twist, offset in itertools.product(TWISTS_INSIDE, (-0.015, 0.015)):
        assert digits_of(signal(digit, twist, offset)) == digit, (twist, offset)


@pytest.mark.parametrize("digit", list(KEYS))
def test_rejected_beyond_the_twist_limits(digit: str) -> None:
    for twist, offset in itertools.product(TWISTS_OUTSIDE, (-0.015, 0.0, 0.015)):
        assert digits_of(signal(digit, twist, offset)) == "", (twist, offset)


@pytest.mark.parametrize("digit", list(KEYS))
def test_twist_limits_hold_wherever_the_tone_falls_on_the_hop_grid(digit: str) -> None:
    """The same limits with the tone starting anywhere within a hop and random phases."""
    rng = np.random.default_rng(ord(digit))
    weaker = CFG.min_level_dbfs + LEVEL_ABOVE_MIN_DB
    for twist, offset, _ in itertools.product(TWISTS_INSIDE + TWISTS_OUTSIDE, (-0.015, 0.015),
                                              range(3)):
        shift = int(rng.integers(0, CFG.hop))
        phases = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)))
        x = tone_pair(digit, twist, offset, weaker, shift=shift, phases=phases, seed=shift)
        expected = digit if twist in TWISTS_INSIDE else ""
        assert digits_of(x) == expected, (twist, offset, shift, phases)


@pytest.mark.parametrize("digit", list(KEYS))
def test_rejected_at_3_5_percent(digit: str) -> None:
    for twist, offset in itertools.product((0.0, *TWISTS_INSIDE), (-0.035, 0.035)):
        assert digits_of(signal(digit, twist, offset)) == "", (twist, offset)


@pytest.mark.parametrize("digit", list(KEYS))
def test_measured_twist_level_and_frequency_match_the_signal(digit: str) -> None:
    """Within 0.5 dB of the synthesised twist and levels, within 0.05 % of the synthesised
    frequencies; every 25 ms span the receiver judges, anywhere in the tone."""
    det = DtmfDetector(CFG)
    span = CFG.hop * (WINDOW_HOPS + 1)
    low, high = KEYS[digit]
    twists = (-CFG.twist_normal_db, TWISTS_INSIDE[0], 0.0, TWISTS_INSIDE[1], CFG.twist_reverse_db)
    checked = 0
    for twist, offset in itertools.product(twists, (-0.015, 0.0, 0.015)):
        top = loudest_weaker_dbfs(twist)
        for weaker in (CFG.min_level_dbfs, -35.0, -25.0, top):
            x = tone_pair(digit, twist, offset, weaker, pad_ms=0, seed=checked)
            lo_db, hi_db = levels(twist, weaker)
            for at in range(0, x.size - span + 1, 37):
                m = det.measure(x[at:at + span])
                case = (twist, offset, weaker, at)
                assert m is not None and m.digit == digit, case
                assert abs(m.twist_db - twist) <= 0.5, (m, case)
                assert abs(m.row_dbfs - lo_db) <= 0.5 and abs(m.col_dbfs - hi_db) <= 0.5, (m, case)
                assert abs(m.row_hz / (low * (1 + offset)) - 1) <= 0.0005, (m, case)
                assert abs(m.col_hz / (high * (1 + offset)) - 1) <= 0.0005, (m, case)
                checked += 1
    assert checked == len(twists) * 3 * 4 * 8

