"""DTMF generation: right frequencies, level and timing."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.audio import dtmf
from appliance.audio.dsp import bin_powers, rms_dbfs

ALL_FREQS = list(dtmf.ROW_HZ + dtmf.COL_HZ)


@pytest.mark.parametrize("digit", list(dtmf.DIGITS))
def test_each_digit_has_its_row_and_column_tone(digit: str) -> None:
    x = dtmf.tone(digit, 560, 8000)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size), n=8000))
    peaks = sorted(int(i) for i in np.argsort(spectrum)[-2:])
    low, high = dtmf.digit_freqs(digit)
    assert all(abs(p - f) <= 2 for p, f in zip(peaks, (low, high), strict=True))
    # Goertzel-style check: the two right bins hold almost all the energy of the eight.
    powers = bin_powers(x[None, :], ALL_FREQS, 8000)[0]
    top = {ALL_FREQS[i] for i in np.argsort(powers)[-2:]}
    assert top == {low, high}
    assert powers[ALL_FREQS.index(low)] == pytest.approx(0.1, rel=0.05)  # -10 dBFS per tone


def test_sequence_timing_and_level() -> None:
    x = dtmf.sequence("159#", 8000)
    assert x.shape == (4 * 1120,)
    assert rms_dbfs(x[:560]) == pytest.approx(-7.0, abs=0.2)  # two tones at -10 dBFS
    assert not np.any(x[560:1120])


def test_tone_pieces_join_seamlessly() -> None:
    whole = dtmf.tone("7", 560)
    pieces = np.concatenate([dtmf.tone("7", 200), dtmf.tone("7", 360, offset=200)])
    assert np.array_equal(whole, pieces)


def test_bad_digit_is_named() -> None:
    with pytest.raises(ValueError, match="'X'"):
        dtmf.digit_freqs("X")
    with pytest.raises(ValueError, match="'12'"):
        dtmf.digit_freqs("12")
