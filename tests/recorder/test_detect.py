"""The per-line call detector, run on the line simulator's ground truth.

The phone lines are simulated (appliance.audio.simulator): a real line cannot run here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audio.simulator import LineSimulator, SimCall
from appliance.recorder.detect import (
    CALL_DISCARD,
    CALL_END,
    CALL_START,
    CallDetector,
    DetectorConfig,
    DetectorEvent,
)
from linerec_contract.errors import ConfigError, FormatError

RATE = 8000
CFG = DetectorConfig()
FRAME = CFG.frame_len
PRE_ROLL = round(CFG.pre_roll_s * RATE)
DEBOUNCE = CFG.start_debounce_ms * RATE // 1000
HANGOVER = round(CFG.hangover_s * RATE)
STOP = round(CFG.stop_delay_s * RATE)


def run(
    x: np.ndarray, sizes: Iterable[int] | None = None, cfg: DetectorConfig = CFG, start: int = 0
) -> list[DetectorEvent]:
    """Events of a fresh detector fed ``x`` in blocks of ``sizes`` (cycled; one block if None)."""
    det = CallDetector(cfg)
    if sizes is None:
        return det.process(start, x)
    events: list[DetectorEvent] = []
    pos = 0
    size_list = list(sizes)
    i = 0
    while pos < x.shape[0]:
        n = size_list[i % len(size_list)]
        events += det.process(start + pos, x[pos : pos + n])
        pos += n
        i += 1
    return events


def pairs(events: list[DetectorEvent]) -> list[tuple[DetectorEvent, DetectorEvent]]:
    """(start, end) pairs; asserts that events alternate and carry consistent lengths."""
    out = []
    for i in range(0, len(events) - 1, 2):
        start, end = events[i], events[i + 1]
        assert start.kind == CALL_START
        assert end.kind in (CALL_END, CALL_DISCARD)
        assert end.call_frames == end.frame - start.frame > 0
        out.append((start, end))
    if len(events) % 2:
        assert events[-1].kind == CALL_START
    return out


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(round(seconds * RATE)) * 10 ** (dbfs / 20) * 32768
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def check_calls_detected(truth: list[SimCall], events: list[DetectorEvent], n: int) -> None:
    """Each whole call is exactly one detection, with start and end where they belong."""
    found = pairs(events)
    # Calls whose stop delay ran out inside the audio; any later one may still be open.
    complete = [c for c in truth if c.end_frame + STOP + FRAME <= n]
    assert len(found) == len(complete), (truth, events)
    prev_end = 0
    for call, (start, end) in zip(complete, found, strict=False):
        assert end.kind == CALL_END
        expected_start = max(call.start_frame - PRE_ROLL, prev_end, 0)
        # Frames quantise the first voice frame by up to one frame either way.
        assert abs(start.frame - expected_start) <= FRAME, (call, start)
        assert start.frame <= call.start_frame
        assert call.start_frame - start.frame <= PRE_ROLL + DEBOUNCE
        # End: the last voice frame plus the hangover, never the whole stop delay.
        assert call.end_frame + HANGOVER - FRAME <= end.frame <= call.end_frame + HANGOVER + FRAME
        prev_end = end.frame


@pytest.mark.parametrize(("seed", "lines"), [(1, 2), (2, 3), (3, 4), (4, 4)])
def test_every_simulated_call_is_one_detection(seed: int, lines: int) -> None:
    n = 600 * RATE
    sim = LineSimulator(lines, seed=seed)
    audio = sim.render(0, n)
    truth = sim.calls_between(0, n)
    assert len(truth) >= 8 * lines
    for line in range(lines):
        events = run(np.ascontiguousarray(audio[:, line]))
        check_calls_detected([c for c in truth if c.line == line], events, n)


def test_short_pause_busy_schedule_still_separates_calls() -> None:
    # Minimum idle gaps (6 s) against a 4 s stop delay: calls must not merge.
    n = 600 * RATE
    sim = LineSimulator(2, seed=21, mean_idle_s=0.5, mean_call_s=5.0, max_call_s=12.0)
    audio = sim.render(0, n)
    truth = sim.calls_between(0, n)
    for line in range(2):
        events = run(np.ascontiguousarray(audio[:, line]))
        check_calls_detected([c for c in truth if c.line == line], events, n)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=6))
def test_events_do_not_depend_on_block_sizes(sizes: list[int]) -> None:
    x = np.ascontiguousarray(_busy_line())
    assert run(x, sizes) == run(x)


@settings(max_examples=30, deadline=None)
@given(
    split=st.integers(0, 120 * RATE),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
)
def test_state_round_trip_resumes_exactly(split: int, sizes: list[int]) -> None:
    x = _busy_line()
    expected = run(x)
    det = CallDetector(CFG)
    events: list[DetectorEvent] = []
    pos, i = 0, 0
    while pos < split:
        n = min(sizes[i % len(sizes)], split - pos)
        events += det.process(pos, x[pos : pos + n])
        pos += n
        i += 1
    state = json.loads(json.dumps(det.to_state()))
    resumed = CallDetector.from_state(CFG, state)
    assert resumed.in_call == det.in_call
    assert resumed.noise_floor_db == det.noise_floor_db
    events += resumed.process(split, x[split:])
    assert events == expected


_BUSY: list[np.ndarray] = []


def _busy_line() -> np.ndarray:
    if not _BUSY:
        sim = LineSimulator(1, seed=5, mean_idle_s=6.0, mean_call_s=8.0, first_call_s=3.0)
        _BUSY.append(np.ascontiguousarray(sim.render(0, 120 * RATE)[:, 0]))
        assert len(run(_BUSY[0])) >= 6
    return _BUSY[0]


@pytest.mark.parametrize(
    ("before", "after"),
    [(-65.0, -56.0), (-65.0, -40.0), (-40.0, -65.0), (-70.0, -30.0), (-120.0, -45.0)],
)
def test_noise_steps_never_start_a_call(before: float, after: float) -> None:
    x = np.concatenate([noise(30, before, seed=1), noise(60, after, seed=2),
                        noise(30, before, seed=3)])
    det = CallDetector(CFG)
    assert det.process(0, x) == []
    assert not det.in_call
    assert abs(det.noise_floor_db - before) < 3.0


def test_floor_follows_a_step_and_calls_on_top_are_still_found() -> None:
    n = 300 * RATE
    sim = LineSimulator(1, seed=8)
    x = sim.render(0, n)[:, 0].astype(np.int32)
    truth = sim.calls_between(0, n)
    # Raise the line noise by 20 dB in the middle of an idle gap and keep it up.
    gap = next(
        (a.end_frame, b.start_frame)
        for a, b in zip(truth, truth[1:], strict=False)
        if a.end_frame > 60 * RATE
    )
    step_at = (gap[0] + gap[1]) // 2
    x[step_at:] += noise((n - step_at) / RATE, -45.0, seed=4)
    x16 = np.clip(x, -32768, 32767).astype(np.int16)
    det = CallDetector(CFG)
    events = det.process(0, x16)
    check_calls_detected(truth, events, n)
    assert -48.0 < det.noise_floor_db < -42.0


def test_short_burst_is_discarded_and_pre_roll_clamps() -> None:
    burst = noise(0.5, -20.0, seed=5)
    x = np.concatenate([noise(10, -65.0, seed=6), burst, noise(10, -65.0, seed=7)])
    events = run(x)
    assert [e.kind for e in events] == [CALL_START, CALL_DISCARD]
    assert events[0].frame == 8 * RATE
    assert events[1].frame == round(10.5 * RATE) + HANGOVER

    # Two calls 4.5 s apart with a 5 s pre-roll: the second starts where the first ended.
    cfg = DetectorConfig(pre_roll_s=5.0)
    talk = noise(2.0, -20.0, seed=8) * np.repeat(np.resize([1, 0], 8), 2000).astype(np.int16)
    x = np.concatenate([noise(1, -65.0, seed=9), talk, noise(4.5, -65.0, seed=10), talk,
                        noise(6, -65.0, seed=11)])
    (s1, e1), (s2, e2) = pairs(run(x, cfg=cfg))
    assert s1.frame == 0
    assert e1.kind == e2.kind == CALL_END
    assert s2.frame == e1.frame


def test_a_gap_in_the_source_counts_as_silence() -> None:
    talk = noise(2.0, -20.0, seed=13) * np.repeat(np.resize([1, 0], 8), 2000).astype(np.int16)
    x = np.concatenate([noise(3, -65.0, seed=12), talk])
    det = CallDetector(CFG)
    events = det.process(0, x)
    assert [e.kind for e in events] == [CALL_START]
    events = det.process(x.shape[0] + 10 * RATE + 7, noise(1, -65.0, seed=14))
    assert [e.kind for e in events] == [CALL_END]
    assert abs(events[0].frame - (x.shape[0] - 2000 + HANGOVER)) <= FRAME
    with pytest.raises(ValueError, match="before the next expected"):
        det.process(0, x[:10])


def test_bad_input_is_rejected_with_a_message() -> None:
    det = CallDetector(CFG)
    with pytest.raises(ValueError, match="1-D int16"):
        det.process(0, np.zeros(10, dtype=np.float32))
    with pytest.raises(ConfigError, match="stop_delay_s"):
        DetectorConfig(stop_delay_s=0.0)
    with pytest.raises(ConfigError, match="frame_ms"):
        DetectorConfig(rate=44100, frame_ms=15)
    with pytest.raises(FormatError, match="version"):
        CallDetector.from_state(CFG, {**det.to_state(), "version": 99})
    with pytest.raises(FormatError, match="malformed"):
        CallDetector.from_state(CFG, {"version": 1})


def test_telemetry_properties() -> None:
    det = CallDetector(CFG)
    assert not det.in_call
    det.process(0, noise(5, -60.0, seed=15))
    assert abs(det.level_db - -60.0) < 2.0
    assert abs(det.noise_floor_db - -60.0) < 2.0
    det.process(5 * RATE, noise(1, -20.0, seed=16) * np.repeat([1, 0], 4000).astype(np.int16))
    assert det.in_call


def test_noise_step_during_a_call_does_not_hold_it_open() -> None:
    gate = np.repeat(np.resize([1, 0], 20), 1600).astype(np.int16)  # 4 s of 0.2 s syllables
    talk = noise(4.0, -20.0, seed=17) * gate
    x = np.concatenate([noise(5, -65.0, seed=18), talk]).astype(np.int32)
    tail = noise(31, -40.0, seed=19)  # the line noise steps up 1 s before the talker stops
    x = np.concatenate([x, noise(30, -65.0, seed=20)])
    x[8 * RATE :] += tail[: x.shape[0] - 8 * RATE]
    events = run(np.clip(x, -32768, 32767).astype(np.int16))
    (start, end), = pairs(events)
    assert end.kind == CALL_END
    assert abs(end.frame - (9 * RATE - 1600 + HANGOVER)) <= FRAME
