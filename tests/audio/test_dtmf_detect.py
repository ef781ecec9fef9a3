"""The DTMF receiver against ITU-T Q.24 limits, with generated signals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audio import dtmf
from appliance.audio.simulator import LineSimulator
from linerec_contract.errors import ConfigError
from tests.audio.talkoff import voiced_speech

RATE = 8000


def pair(digit: str, ms: int = 60, peak_dbfs: float = -12.0, twist_db: float = 0.0,
         off_lo: float = 0.0, off_hi: float = 0.0, phase: float = 0.4) -> np.ndarray:
    """Composite peak ``peak_dbfs``; ``twist_db`` = high-group minus low-group level."""
    lo, hi = dtmf.digit_freqs(digit)
    n = np.arange(RATE * ms // 1000)
    a_hi = 10 ** (twist_db / 20)
    x = np.sin(2 * np.pi * lo * (1 + off_lo) * n / RATE + phase) + \
        a_hi * np.sin(2 * np.pi * hi * (1 + off_hi) * n / RATE + 2 * phase)
    return np.asarray(x / (1 + a_hi) * 10 ** (peak_dbfs / 20) * 0.999)


def pcm(*parts: np.ndarray, noise_dbfs: float | None = None, seed: int = 0) -> np.ndarray:
    x = np.concatenate([np.zeros(400), *parts, np.zeros(800)])
    if noise_dbfs is not None:
        x = x + np.random.default_rng(seed).standard_normal(x.size) * 10 ** (noise_dbfs / 20)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def digits(x: np.ndarray, **cfg: float) -> str:
    return "".join(e.digit for e in dtmf.detect(x, cfg=dtmf.DtmfConfig(**cfg) if cfg else None))


def gap(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000)


def seq(ds: str, **kw: float) -> list[np.ndarray]:
    out = []
    for d in ds:
        out += [pair(d, **kw), gap(60)]  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("peak", [-30.0, -24.0, -18.0, -12.0, -6.0, 0.0])
def test_every_digit_at_levels_from_minus_30_to_0_dbfs(peak: float) -> None:
    assert digits(pcm(*seq(dtmf.DIGITS, peak_dbfs=peak), noise_dbfs=-60)) == dtmf.DIGITS


@pytest.mark.parametrize("twist", [-7.0, -4.0, 0.0, 2.0, 3.0])
def test_twist_within_limits_is_accepted(twist: float) -> None:
    assert digits(pcm(*seq(dtmf.DIGITS, twist_db=twist))) == dtmf.DIGITS


@pytest.mark.parametrize("twist", [-10.0, -12.0, 6.0, 8.0])
def test_twist_beyond_limits_is_rejected(twist: float) -> None:
    assert digits(pcm(*seq(dtmf.DIGITS, twist_db=twist))) == ""


def test_twist_limits_are_configurable() -> None:
    x = pcm(*seq("159", twist_db=-10.0))
    assert digits(x) == ""
    assert digits(x, twist_normal_db=12.0) == "159"


@pytest.mark.parametrize("off", [(0.015, 0.0), (-0.015, 0.0), (0.0, 0.015), (0.0, -0.015),
                                 (0.015, 0.015), (-0.015, 0.015), (0.015, -0.015)])
def test_deviation_within_1_5_percent_is_accepted(off: tuple[float, float]) -> None:
    x = pcm(*seq(dtmf.DIGITS, off_lo=off[0], off_hi=off[1]), noise_dbfs=-50)
    assert digits(x) == dtmf.DIGITS


@pytest.mark.parametrize("off", [(0.035, 0.0), (-0.035, 0.0), (0.0, 0.035), (0.0, -0.035),
                                 (0.035, 0.035), (0.05, -0.05), (-0.06, 0.0)])
def test_deviation_beyond_3_5_percent_is_rejected(off: tuple[float, float]) -> None:
    x = pcm(*seq(dtmf.DIGITS, off_lo=off[0], off_hi=off[1]), noise_dbfs=-50)
    assert digits(x) == ""


@pytest.mark.parametrize("phase", [0.0, 1.0, 2.0, 3.0, 4.0])
def test_40_ms_tones_and_pauses_are_recognised(phase: float) -> None:
    # Also the same digit repeated: the 40 ms pause must separate them.
    parts = []
    for d in "11223344" + dtmf.DIGITS:
        parts += [pair(d, ms=40, phase=phase), gap(40)]
    shift = np.zeros(int(phase * 7))  # tones at different positions on the hop grid
    assert digits(pcm(shift, *parts)) == "11223344" + dtmf.DIGITS


@pytest.mark.parametrize("ms", [15, 20, 25])
def test_tones_shorter_than_the_minimum_are_rejected(ms: int) -> None:
    parts = []
    for d in dtmf.DIGITS:
        parts += [pair(d, ms=ms), gap(60)]
    assert digits(pcm(*parts)) == ""


def test_a_10_ms_break_does_not_split_a_digit() -> None:
    assert digits(pcm(pair("5", ms=60), gap(10), pair("5", ms=60))) == "5"


@pytest.mark.parametrize("snr_db", [25.0, 20.0, 15.0])
def test_digits_in_noise(snr_db: float) -> None:
    # Per-tone level -25 dBFS; white noise over the whole band snr_db below the digit's power.
    x = pcm(*seq(dtmf.DIGITS, peak_dbfs=-19.0), noise_dbfs=-22.0 - snr_db, seed=int(snr_db))
    assert digits(x) == dtmf.DIGITS


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=30), st.integers(0, 2**31))
def test_any_chunking_and_restore_give_the_same_events(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = "".join(rng.choice(list(dtmf.DIGITS), 6))
    x = pcm(*seq(ds), noise_dbfs=-50, seed=seed)
    whole = dtmf.detect(x)
    det = dtmf.DtmfDetector()
    got: list[dtmf.DtmfEvent] = []
    pos, i = 0, 0
    while pos < x.size:
        n = sizes[i % len(sizes)]
        got += det.process(pos, x[pos:pos + n])
        det = dtmf.DtmfDetector.from_state(None, det.to_state())
        pos, i = pos + n, i + 1
    got += det.flush()
    assert got == whole
    assert "".join(e.digit for e in whole) == ds


def test_event_times_follow_the_tone() -> None:
    x = pcm(gap(100), pair("7", ms=80))
    (ev,) = dtmf.detect(x)
    start = 400 + 800
    assert abs(ev.start - start) <= 40 and abs(ev.end - (start + 640)) <= 80


def test_simulator_speech_gives_no_false_digits() -> None:
    """Ten minutes of the simulator's lines: exactly the dialled digits, nothing in speech."""
    sim = LineSimulator(1, RATE, seed=9, mean_idle_s=6.0, mean_call_s=40.0, max_call_s=90.0)
    total = 600 * RATE
    x = sim.render(0, total)[:, 0]
    truth = "".join(c.digits for c in sim.calls_between(0, total))
    assert "".join(e.digit for e in dtmf.detect(x)) == truth


def test_voiced_speech_with_pitch_glides_gives_few_false_digits() -> None:
    minutes = 10.0
    x = voiced_speech(minutes * 60, RATE, seed=11)
    false = len(dtmf.detect(x))
    print(f"talk-off: {false} false digits in {minutes} min of harmonic voiced speech")
    assert false <= 1


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="twist_normal_db"):
        dtmf.DtmfConfig(twist_normal_db=40.0)
