"""Speech-like test signals for DTMF talk-off (shared by tests/audio and bench/dtmf.py)."""

from __future__ import annotations

import numpy as np


def voiced_speech(seconds: float, rate: int = 8000, seed: int = 1, level_dbfs: float = -18.0) -> np.ndarray:
    """Harmonic, voiced-speech-like int16 audio: a glottal pulse train (pitch 80-320 Hz with
    glides and vibrato) shaped by three moving formants, syllable-rate envelope and pauses.
    Harder than noise for a DTMF receiver: at times two harmonics fall on a row and a column
    frequency."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    # Pitch: piecewise glides between random targets every 150-400 ms, plus vibrato.
    knots = np.cumsum(rng.uniform(0.15, 0.4, int(seconds / 0.15) + 2))
    targets = rng.uniform(80.0, 320.0, knots.size)
    f0 = np.interp(t, knots, targets) * (1.0 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros(n)
    block = rate // 10
    for k in range(1, 40):
        out += np.sin(k * phase) / k ** 0.7 * (k * f0 < 3600)
    # Formants: a time-varying spectral tilt applied in 100 ms blocks with an FFT.
    shaped = np.zeros(n)
    for b in range(0, n, block):
        seg = out[b:b + block]
        freqs = np.fft.rfftfreq(seg.size, 1 / rate)
        f1, f2, f3 = rng.uniform(300, 900), rng.uniform(900, 2300), rng.uniform(2300, 3200)
        gain = sum(1.0 / (1.0 + ((freqs - f) / bw) ** 2) for f, bw in ((f1, 90), (f2, 120), (f3, 160)))
        shaped[b:b + block] = np.fft.irfft(np.fft.rfft(seg) * (gain + 0.05), n=seg.size)
    env = 0.3 + 0.7 * 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 6) * t))
    talk = (np.sin(2 * np.pi * 0.21 * t + rng.uniform(0, 6)) > -0.4).astype(float)
    shaped *= env * talk
    shaped /= np.sqrt(np.mean(shaped**2)) + 1e-12
    shaped *= 10 ** (level_dbfs / 20)
    shaped += rng.standard_normal(n) * 10 ** (-65 / 20)
    return np.clip(np.rint(shaped * 32768), -32768, 32767).astype(np.int16)
