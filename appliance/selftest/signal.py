"""Measurements of one line's audio for the self-test (numpy, int16 at the storage rate).

Levels are RMS in dBFS with full scale 32768 (the convention of :mod:`appliance.audio.dsp`: a
full-scale sine reads -3.01 dBFS). Telephone levels are given in dBm0; by ITU-T G.711 the
digital milliwatt (0 dBm0) peaks 3.14 dB below the coder's overload point, so 0 dBm0 reads
-3.01 - 3.14 = -6.15 dBFS here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from appliance.audio.dsp import FLOOR_DBFS, bin_powers, frame_levels_db, power_to_db

DBM0_DBFS = -6.15
"""0 dBm0 in dBFS (ITU-T G.711 digital milliwatt)."""
FRAME_S = 0.02
FULL_SCALE = 32767
"""A stored sample at or beyond this magnitude sits at the converter's limit (clipped)."""
MAINS_HZ = (50.0, 60.0)
VOICE_ABOVE_FLOOR_DB = 15.9
"""ITU-T P.56 method B: speech is active where the envelope is 15.9 dB above the threshold."""
ACTIVE_FRACTION = 0.2
"""A take counts as "during a call" when at least this share of it is active speech."""


def dbm0(dbfs: float) -> float:
    return dbfs - DBM0_DBFS


def dbfs(dbm0_level: float) -> float:
    return dbm0_level + DBM0_DBFS


@dataclass(frozen=True)
class LineMeasures:
    rms_dbfs: float
    peak: int
    noise_floor_dbfs: float
    hum_hz: float
    hum_dbfs: float
    dc_fraction: float
    clipped: int
    samples: int
    active_fraction: float
    active_dbfs: float


def measure(x: npt.NDArray[np.int16], rate: int) -> LineMeasures:
    """All the measures the line checks grade, from one channel of a take."""
    xi = x.astype(np.int32)
    f = x.astype(np.float64) / 32768.0
    n = f.size
    if n == 0:
        return LineMeasures(FLOOR_DBFS, 0, FLOOR_DBFS, MAINS_HZ[0], FLOOR_DBFS, 0.0, 0, 0, 0.0,
                            FLOOR_DBFS)
    frame = max(1, round(FRAME_S * rate))
    levels = frame_levels_db(f, frame) if n >= frame else np.array([power_to_db(float(np.mean(f * f)))])
    floor = float(np.percentile(levels, 10))
    dc = float(np.mean(f))
    ac = f - dc
    # Mains hum: one-second windows resolve 50 and 60 Hz cleanly; keep the strongest window.
    win = min(n, rate)
    windows = ac[: (n // win) * win].reshape(-1, win)
    powers = bin_powers(windows - windows.mean(axis=1, keepdims=True), list(MAINS_HZ), rate)
    strongest = powers.max(axis=0)
    k = int(np.argmax(strongest))
    active = levels > max(floor + VOICE_ABOVE_FLOOR_DB, FLOOR_DBFS + 30.0)
    frac = float(np.mean(active)) if levels.size else 0.0
    frames = f[: levels.size * frame].reshape(levels.size, frame) if n >= frame else f[None, :]
    active_power = float(np.mean(frames[active] ** 2)) if active.any() else 0.0
    return LineMeasures(
        rms_dbfs=power_to_db(float(np.mean(f * f))),
        peak=int(np.max(np.abs(xi))),
        noise_floor_dbfs=floor,
        hum_hz=MAINS_HZ[k],
        hum_dbfs=power_to_db(float(strongest[k])),
        dc_fraction=dc,
        clipped=int(np.count_nonzero((xi >= FULL_SCALE) | (xi <= -FULL_SCALE - 1))),
        samples=n,
        active_fraction=frac,
        active_dbfs=power_to_db(active_power) if active.any() else FLOOR_DBFS,
    )


def dominant_tone(x: npt.NDArray[np.float64], rate: int) -> tuple[float, float, float]:
    """(frequency in Hz, level of that tone in dBFS, level of everything else in dBFS) of the
    strongest spectral peak, Hann-windowed, interpolated between FFT bins."""
    n = x.size
    if n < 16:
        return 0.0, FLOOR_DBFS, FLOOR_DBFS
    w = np.hanning(n)
    spec = np.abs(np.fft.rfft((x - x.mean()) * w)) ** 2
    k = int(np.argmax(spec[1:])) + 1
    if 0 < k < spec.size - 1:
        a, b, c = np.log(spec[k - 1 : k + 2] + 1e-30)
        delta = 0.5 * (a - c) / (a - 2 * b + c)
    else:
        delta = 0.0
    # Power of the peak: the Hann main lobe spans 2 bins each side.
    lo, hi = max(1, k - 3), min(spec.size, k + 4)
    scale = 2.0 / (np.sum(w**2) * n)
    tone_p = float(np.sum(spec[lo:hi])) * scale
    rest_p = float(np.sum(spec[1:lo]) + np.sum(spec[hi:])) * scale
    return (k + delta) * rate / n, power_to_db(tone_p), power_to_db(rest_p)
