"""Benchmark of the DTMF receiver (ITU-T Q.24): detection, rejection, talk-off and speed.

Usage: ``python bench/dtmf.py [--json] [--minutes N]``. In one run it measures

- detection rate on valid digits: all 16 digits at levels -30..0 dBFS (composite peak), twist
  within limits, frequency offsets within 1.5 %, 40 ms tones and pauses, in -50 dBFS noise;
- false digits on out-of-spec tones: offsets of 3.5 % and 5 %, tones of 20-25 ms, twist beyond
  the limits;
- false digits per hour of speech-like audio: the line simulator's speech (digits removed) and
  harmonic voiced speech with pitch glides (tests/audio/talkoff.py);
- channel-seconds analysed per CPU second, next to a reference measured in the same run: a plain
  per-frame 8-bin Goertzel (``bin_powers``) over the same audio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.audio import dtmf  # noqa: E402
from appliance.audio.dsp import bin_powers  # noqa: E402
from appliance.audio.simulator import LineSimulator  # noqa: E402
from tests.audio.talkoff import voiced_speech  # noqa: E402

RATE = 8000


def pair(digit: str, ms: int, peak_dbfs: float, twist_db: float = 0.0, off_lo: float = 0.0,
         off_hi: float = 0.0, phase: float = 0.0) -> np.ndarray:
    """A digit whose composite peak is ``peak_dbfs``; ``twist_db`` = high minus low tone."""
    lo, hi = dtmf.digit_freqs(digit)
    n = np.arange(RATE * ms // 1000)
    a_lo, a_hi = 1.0, 10 ** (twist_db / 20)
    x = a_lo * np.sin(2 * np.pi * lo * (1 + off_lo) * n / RATE + phase) + \
        a_hi * np.sin(2 * np.pi * hi * (1 + off_hi) * n / RATE + 2 * phase)
    return np.asarray(x / (a_lo + a_hi) * 10 ** (peak_dbfs / 20) * 0.999)


def run_cases(cases: list[dict[str, Any]], seed: int) -> tuple[int, int, int]:
    """(digits sent, digits detected correctly, wrong or extra digits)."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(800)]
    sent = ""
    for c in cases:
        ms, pause = c.pop("ms", 60), c.pop("pause", 60)
        parts.append(pair(phase=float(rng.uniform(0, 6)), ms=ms, **c))
        parts.append(np.zeros(RATE * pause // 1000))
        sent += c["digit"]
    x = np.concatenate(parts)
    x += rng.standard_normal(x.size) * 10 ** (-50 / 20)
    got = "".join(e.digit for e in dtmf.detect(np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)))
    ok = sum(1 for a, b in zip(sent, got, strict=False) if a == b) if len(got) == len(sent) else \
        sum(1 for d in sent if d in got)
    return len(sent), ok, max(0, len(got) - ok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--minutes", type=float, default=20.0, help="speech-like audio per kind")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(7)
    valid: list[dict[str, Any]] = []
    valid += [{"digit": d, "peak_dbfs": lv} for lv in (-30.0, -20.0, -10.0, 0.0) for d in dtmf.DIGITS]
    for d in dtmf.DIGITS:
        valid += [{"digit": d, "peak_dbfs": -12.0, "twist_db": tw} for tw in (-7.0, 3.0)]
        valid += [{"digit": d, "peak_dbfs": -12.0, "off_lo": off, "off_hi": -off}
                  for off in (-0.015, 0.015)]
        valid.append({"digit": d, "peak_dbfs": -12.0, "ms": 40, "pause": 40})
    rng.shuffle(valid)  # type: ignore[arg-type]
    sent, ok, wrong = run_cases(valid, 1)
    invalid_total = 0
    invalid_false = 0
    for d in dtmf.DIGITS:
        for case in ({"off_lo": 0.035}, {"off_hi": -0.035}, {"off_lo": -0.05, "off_hi": 0.05},
                     {"ms": 20}, {"ms": 25}, {"twist_db": -11.0}, {"twist_db": 7.0}):
            s, hit, extra = run_cases([{"digit": d, "peak_dbfs": -12.0, **case}], 2)
            invalid_total += s
            invalid_false += hit + extra
    seconds = args.minutes * 60
    sim = LineSimulator(1, RATE, seed=5, mean_idle_s=6.0, mean_call_s=60.0, max_call_s=120.0)
    x_sim = sim.render(0, int(seconds * RATE))[:, 0]
    truth = sum(len(c.digits) for c in sim.calls_between(0, x_sim.size))
    t0 = time.process_time()
    sim_digits = len(dtmf.detect(x_sim))
    cpu_sim = time.process_time() - t0
    x_voiced = voiced_speech(seconds, RATE, seed=3)
    t0 = time.process_time()
    voiced_false = len(dtmf.detect(x_voiced))
    cpu_voiced = time.process_time() - t0
    t0 = time.process_time()
    frames = (x_voiced[: x_voiced.size // 205 * 205].astype(np.float64) / 32768).reshape(-1, 205)
    bin_powers(frames, list(dtmf.ROW_HZ + dtmf.COL_HZ), RATE)
    cpu_ref = time.process_time() - t0
    hours = seconds / 3600
    result = {
        "valid_digits": sent,
        "detection_rate": round(ok / sent, 4),
        "wrong_or_extra_on_valid": wrong,
        "out_of_spec_tones": invalid_total,
        "false_digits_on_out_of_spec": invalid_false,
        "speech_minutes_per_kind": args.minutes,
        "simulator_speech_false_per_hour": round(max(0, sim_digits - truth) / hours, 2),
        "simulator_digits_expected_detected": [truth, sim_digits],
        "voiced_speech_false_per_hour": round(voiced_false / hours, 2),
        "channel_seconds_per_cpu_second": round(2 * seconds / (cpu_sim + cpu_voiced), 1),
        "reference_goertzel_channel_seconds_per_cpu_second": round(seconds / max(cpu_ref, 1e-9), 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:<52} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
