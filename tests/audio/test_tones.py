"""Call-progress tones of every country preset, and the ring signal."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.audio import tones
from appliance.audio.simulator import LineSimulator

RATE = 8000
CASES = [(c, s.kind) for c in tones.COUNTRIES for s in tones.PRESETS[c]]


def pcm(x: np.ndarray, noise_dbfs: float = -60.0) -> np.ndarray:
    x = x + np.random.default_rng(1).standard_normal(x.size) * 10 ** (noise_dbfs / 20)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def run(country: str, x: np.ndarray, sizes: tuple[int, ...] = (160, 4001, 37)) -> list[tones.ToneEvent]:
    det = tones.ToneDetector(tones.ToneConfig(country=country))
    out: list[tones.ToneEvent] = []
    pos, i = 0, 0
    while pos < x.size:
        n = sizes[i % len(sizes)]
        out += det.process(pos, x[pos:pos + n])
        det = tones.ToneDetector.from_state(tones.ToneConfig(country=country), det.to_state())
        pos, i = pos + n, i + 1
    return out + det.flush()


@pytest.mark.parametrize(("country", "kind"), CASES)
def test_each_preset_tone_is_recognised(country: str, kind: str) -> None:
    lead = RATE
    tone = tones.render(kind, country, 12.0)
    last_on = lead + int(np.flatnonzero(tone)[-1]) + 1
    x = pcm(np.concatenate([np.zeros(lead), tone, np.zeros(7 * RATE)]))
    events = run(country, x)
    starts = [e for e in events if e.state == "start"]
    assert [e.kind for e in starts] == [kind], events
    assert abs(starts[0].start - lead) <= 0.05 * RATE
    ends = [e for e in events if e.state == "end"]
    assert len(ends) == 1 and abs(ends[0].frame - last_on) <= 0.06 * RATE


@pytest.mark.parametrize("country", tones.COUNTRIES)
def test_speech_and_dtmf_are_not_tones(country: str) -> None:
    sim = LineSimulator(1, RATE, seed=2, mean_idle_s=6.0, mean_call_s=30.0, max_call_s=60.0)
    x = sim.render(0, 240 * RATE)[:, 0]
    assert run(country, x, sizes=(8000,)) == []


def test_busy_at_low_level_in_noise() -> None:
    x = pcm(np.concatenate([np.zeros(RATE), tones.render("busy", "na", 5.0, level_dbfs=-35.0)]),
            noise_dbfs=-55.0)
    assert [e.kind for e in run("na", x) if e.state == "start"] == ["busy"]


def test_unknown_country_is_named() -> None:
    with pytest.raises(Exception, match="'mars'"):
        tones.ToneConfig(country="mars")
