"""Levels and single-bin powers."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.audio.dsp import (
    FLOOR_DBFS,
    bin_powers,
    frame_levels_db,
    peak_dbfs,
    rms_dbfs,
    to_float,
)


def test_levels_of_known_signals() -> None:
    t = np.arange(8000) / 8000
    sine = np.sin(2 * np.pi * 1000 * t)
    assert rms_dbfs(sine) == pytest.approx(-3.0103, abs=1e-3)
    assert peak_dbfs(sine) == pytest.approx(0.0, abs=1e-6)
    pcm = np.rint(sine * 0.1 * 32767).astype(np.int16)
    assert rms_dbfs(pcm) == pytest.approx(-23.01, abs=0.01)
    assert rms_dbfs(np.zeros(100, dtype=np.int16)) == FLOOR_DBFS
    assert peak_dbfs(np.zeros(0)) == FLOOR_DBFS
    with pytest.raises(ValueError, match="int16 or float"):
        to_float(np.zeros(3, dtype=np.int32))


def test_frame_levels_match_per_frame_rms() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * 1000).astype(np.int16)
    levels = frame_levels_db(x, 160)
    assert levels.shape == (6,)
    for i, lv in enumerate(levels):
        assert lv == pytest.approx(rms_dbfs(x[i * 160 : (i + 1) * 160]))


def test_bin_powers_pick_out_a_tone() -> None:
    n = np.arange(205)
    frame = 0.5 * np.sin(2 * np.pi * 770 * n / 8000)
    p = bin_powers(frame[None, :], [697.0, 770.0, 852.0], 8000)
    assert p.shape == (1, 3)
    assert p[0, 1] == pytest.approx(0.125, rel=0.02)
    assert p[0, 0] < 0.01 and p[0, 2] < 0.01
