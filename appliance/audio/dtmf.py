"""DTMF (ITU-T Q.23) tone generation.

A digit is the sum of one row and one column frequency. Levels are per tone, RMS, in dBFS.
"""

from __future__ import annotations

import numpy as np

from appliance.audio.dsp import FloatArray, db_to_amplitude

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
