"""The line simulator: a pure function of its arguments, with a sane call schedule."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audio import dtmf
from appliance.audio.dsp import frame_levels_db, rms_dbfs
from appliance.audio.simulator import LineSimulator

RATE = 8000


def _busy(seed: int = 7, lines: int = 2) -> LineSimulator:
    return LineSimulator(lines, seed=seed, mean_idle_s=7.0, mean_call_s=6.0, first_call_s=0.2)


def test_render_shape_and_dtype() -> None:
    sim = _busy()
    out = sim.render(123, 457)
    assert out.shape == (457, 2)
    assert out.dtype == np.int16
    assert sim.render(5, 0).shape == (0, 2)


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, 40_000),
    sizes=st.lists(st.integers(1, 9_000), min_size=1, max_size=12),
)
def test_any_chunking_renders_the_same_bytes(start: int, sizes: list[int]) -> None:
    whole = _busy().render(start, sum(sizes))
    chunked_sim = _busy()  # a fresh instance: no cache shared with the first
    parts = []
    pos = start
    for n in sizes:
        parts.append(chunked_sim.render(pos, n))
        pos += n
    assert np.concatenate(parts).tobytes() == whole.tobytes()


def test_period_chunks_match_one_call_over_a_minute() -> None:
    n = 60 * RATE
    whole = _busy(seed=3, lines=3).render(0, n)
    sim = _busy(seed=3, lines=3)
    chunked = np.concatenate([sim.render(p, 160) for p in range(0, n, 160)])
    assert chunked.tobytes() == whole.tobytes()


def test_order_of_queries_does_not_matter() -> None:
    a = _busy(seed=11)
    b = _busy(seed=11)
    b.calls_between(0, 3600 * RATE)  # schedule far ahead first
    b.render(500 * RATE, 1000)
    assert a.render(10 * RATE, 20 * RATE).tobytes() == b.render(10 * RATE, 20 * RATE).tobytes()
    assert a.calls_between(0, 600 * RATE) == b.calls_between(0, 600 * RATE)


def test_seed_changes_the_audio_and_lines_differ() -> None:
    a = _busy(seed=1).render(0, 30 * RATE)
    b = _busy(seed=2).render(0, 30 * RATE)
    assert a.tobytes() != b.tobytes()
    assert a[:, 0].tobytes() != a[:, 1].tobytes()


def test_call_schedule_is_sane() -> None:
    sim = LineSimulator(3, seed=5, max_call_s=30.0)
    horizon = 3600 * RATE
    calls = sim.calls_between(0, horizon)
    assert calls == sorted(calls, key=lambda c: (c.start_frame, c.line))
    for line in range(3):
        mine = [c for c in calls if c.line == line]
        assert len(mine) > 20
        for c in mine:
            assert 4 * RATE <= c.end_frame - c.start_frame <= 30 * RATE
            assert 3 <= len(c.digits) <= 7
            assert set(c.digits) <= set(dtmf.DIGITS)
        for prev, nxt in zip(mine, mine[1:], strict=False):
            assert nxt.start_frame - prev.end_frame >= 6 * RATE
    # calls_between returns exactly the calls overlapping the span.
    c = calls[10]
    assert c in sim.calls_between(c.end_frame - 1, c.end_frame)
    assert c not in sim.calls_between(c.end_frame, c.end_frame + 1)
    assert c in sim.calls_between(c.start_frame, c.start_frame + 1)
    assert c not in sim.calls_between(c.start_frame - 1, c.start_frame)


def test_levels_of_idle_line_speech_and_dtmf() -> None:
    sim = LineSimulator(2, seed=9)
    n = 300 * RATE
    audio = sim.render(0, n)
    calls = [c for c in sim.calls_between(0, n) if c.end_frame < n]
    assert calls
    for c in calls:
        x = audio[:, c.line]
        idle = x[c.end_frame + RATE : c.end_frame + 5 * RATE]
        assert -67.0 < rms_dbfs(idle) < -63.0
        # The first digit: both tones at about -10 dBFS, so about -7 dBFS together.
        tone = x[c.start_frame : c.start_frame + sim.tone_frames]
        assert -8.5 < rms_dbfs(tone) < -5.5
        # Speech: loud frames around -20 dBFS, and pauses that fall back to the line noise.
        after_digits = c.start_frame + len(c.digits) * (sim.tone_frames + sim.pause_frames)
        levels = frame_levels_db(x[after_digits : c.end_frame], 160)
        speech = levels[levels > -45.0]
        assert -26.0 < 10 * np.log10(np.mean(10 ** (speech / 10))) < -15.0
        assert np.min(levels) < -60.0
        assert np.max(np.abs(x[c.start_frame : c.end_frame])) < 32767


def test_dtmf_digits_are_where_the_ground_truth_says() -> None:
    sim = LineSimulator(1, seed=4)
    c = sim.calls_between(0, 60 * RATE)[0]
    x = sim.render(c.start_frame, len(c.digits) * 2 * sim.tone_frames)[:, 0].astype(float)
    step = sim.tone_frames + sim.pause_frames
    for i, digit in enumerate(c.digits):
        seg = x[i * step : i * step + sim.tone_frames]
        spectrum = np.abs(np.fft.rfft(seg * np.hanning(seg.size), n=8000))
        low_band, high_band = spectrum[600:1000], spectrum[1150:1700]
        assert (600 + int(np.argmax(low_band)), 1150 + int(np.argmax(high_band))) == tuple(
            round(f) for f in dtmf.digit_freqs(digit)
        )
        gap = x[i * step + sim.tone_frames : (i + 1) * step]
        assert rms_dbfs(gap.astype(np.int16)) < -60.0
