"""Basic signal processing: levels in dBFS, per-frame levels, single-bin DFT powers.

Conventions: full scale is 32768 for int16 input and 1.0 for float input; levels are RMS
(a full-scale sine reads -3.01 dBFS); silence reads :data:`FLOOR_DBFS`. Every function is
vectorised with numpy; none loops over samples in Python.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt

FLOOR_DBFS = -120.0
"""The level reported for digital silence (and anything quieter)."""

INT16_FULL_SCALE = 32768.0

_FLOOR_POWER = 10.0 ** (FLOOR_DBFS / 10.0)

FloatArray = npt.NDArray[np.float64]


def to_float(x: npt.NDArray[np.generic]) -> FloatArray:
    """``x`` as float64 scaled so that full scale is 1.0 (int16 is divided by 32768)."""
    arr = np.asarray(x)
    if arr.dtype == np.int16:
        return arr.astype(np.float64) / INT16_FULL_SCALE
    if np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"sample dtype {arr.dtype} is not supported; accepted: int16 or float")
    return arr.astype(np.float64, copy=False)


def power_to_db(power: float) -> float:
    """A mean-square power (full scale 1.0) in dB, floored at :data:`FLOOR_DBFS`."""
    return float(10.0 * np.log10(max(power, _FLOOR_POWER)))


def rms_dbfs(x: npt.NDArray[np.generic]) -> float:
    """RMS level of ``x`` (int16 or float) in dBFS; an empty array reads the floor."""
    f = to_float(x)
    if f.size == 0:
        return FLOOR_DBFS
    return power_to_db(float(np.mean(np.square(f))))


def peak_dbfs(x: npt.NDArray[np.generic]) -> float:
    """Peak absolute sample of ``x`` (int16 or float) in dBFS (full scale reads 0)."""
    f = to_float(x)
    if f.size == 0:
        return FLOOR_DBFS
    peak = float(np.max(np.abs(f)))
    return power_to_db(peak * peak)


def frame_powers(x: npt.NDArray[np.generic], frame_len: int) -> FloatArray:
    """Mean-square power of each whole ``frame_len`` frame of a 1-D signal (tail ignored)."""
    if frame_len <= 0:
        raise ValueError(f"frame_len {frame_len} must be positive")
    f = to_float(x)
    n = f.shape[0] // frame_len
    frames = f[: n * frame_len].reshape(n, frame_len)
    out: FloatArray = np.einsum("ij,ij->i", frames, frames) / frame_len
    return out


def frame_levels_db(x: npt.NDArray[np.generic], frame_len: int) -> FloatArray:
    """RMS level in dBFS of each whole ``frame_len`` frame of a 1-D signal (tail ignored)."""
    power = np.maximum(frame_powers(x, frame_len), _FLOOR_POWER)
    out: FloatArray = 10.0 * np.log10(power)
    return out


def pack_samples(x: npt.NDArray[np.int16]) -> str:
    """int16 samples as base64 of little-endian bytes: a detector's carried samples in a
    checkpoint, one JSON string instead of a list of hundreds of numbers."""
    return base64.b64encode(np.asarray(x, dtype="<i2").tobytes()).decode("ascii")


def unpack_samples(value: Any) -> npt.NDArray[np.int16]:
    """The samples of :func:`pack_samples` (a plain list of numbers is read too)."""
    if isinstance(value, str):
        raw = base64.b64decode(value, validate=True)
        return np.frombuffer(raw, dtype="<i2").astype(np.int16)
    return np.asarray(value, dtype=np.int16)


def db_to_amplitude(db: float) -> float:
    """Linear amplitude (full scale 1.0) for a level in dB."""
    return float(10.0 ** (db / 20.0))


def bin_powers(frames: FloatArray, freqs: FloatArray | list[float], rate: int) -> FloatArray:
    """Goertzel-equivalent power of each frequency in each frame.

    ``frames`` is (n, N) float; the result is (n, len(freqs)) and holds, for each frame, the
    mean-square power of the component at each frequency (a sine of amplitude A reads A**2/2).
    Computed as one matrix product instead of a per-sample Goertzel recursion.
    """
    n_samples = frames.shape[1]
    f = np.asarray(freqs, dtype=np.float64)
    t = np.arange(n_samples, dtype=np.float64)
    phase = 2.0 * np.pi * np.outer(t, f) / rate
    re = frames @ np.cos(phase)
    im = frames @ np.sin(phase)
    out: FloatArray = 2.0 * (re * re + im * im) / float(n_samples * n_samples)
    return out


# OpenBLAS hands a product to its worker threads once m*n*k passes about 65536 (measured with
# numpy's bundled OpenBLAS 0.3); the workers then spin for milliseconds after each call. The
# detectors call a product per line and block, so the spinning doubled the recorder's CPU time.
_SINGLE_THREAD_MNK = 32768


def matmul_rows(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``a @ b`` for a 2-D ``a`` with many rows, computed in row chunks small enough that BLAS
    stays on the calling thread. Each row of the result is the same as in ``a @ b``."""
    rows = max(1, _SINGLE_THREAD_MNK // max(1, a.shape[1] * b.shape[1]))
    if a.shape[0] <= rows:
        out: npt.NDArray[Any] = a @ b
        return out
    return np.concatenate([a[i : i + rows] @ b for i in range(0, a.shape[0], rows)])
