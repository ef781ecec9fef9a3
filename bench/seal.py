"""Benchmark of sealing: size per channel-hour and CPU cost, next to the bare codec and age.

Usage: ``python bench/seal.py [--json] [--minutes N]``. Synthesizes telephone-like speech at
8 kHz (noise and a glottal pulse train shaped by moving formants, syllable-rate amplitude
modulation, pauses between phrases, a faint line-noise floor), cuts it into 60-second segments
and, for each codec, measures in the same run:

- the bare codec (``encode_audio``), the bare age encryption of its output (``pyrage.encrypt``),
- the full ``seal_segment`` (codec + age + sealed metadata + hashes + signature),

all in CPU seconds (``time.process_time``). The ratio sealing / (codec + encryption) should stay
at or below 1.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import pyrage

from linerec_contract.codec import CODECS, encode_audio
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import SegmentInput, seal_segment

RATE = 8000
SEGMENT_SECONDS = 60
TARGET_RATIO = 1.5


def _formant_gain(freqs: np.ndarray, formants: list[tuple[float, float]]) -> np.ndarray:
    gain = np.zeros_like(freqs)
    for centre, width in formants:
        gain += np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    band = (freqs > 300) & (freqs < 3400)  # telephone band
    return gain * np.where(band, 1.0, 0.05)


def synth_speech(seconds: float, seed: int = 7) -> np.ndarray:
    """Speech-like int16 audio: syllables of shaped noise and pulses, with pauses."""
    rng = np.random.default_rng(seed)
    total = int(seconds * RATE)
    out = np.zeros(total)
    pos = 0
    while pos < total:
        # a phrase of 3..12 syllables, then a pause of 0.2..1.5 s
        for _ in range(int(rng.integers(3, 13))):
            n = int(rng.uniform(0.12, 0.3) * RATE)
            if pos + n > total:
                break
            pitch = rng.uniform(90, 220)
            pulses = np.zeros(n)
            pulses[(np.arange(0, n, RATE / pitch)).astype(int)] = 1.0
            voiced = rng.uniform(0.3, 1.0)
            excitation = voiced * pulses * 8 + (1 - voiced) * rng.standard_normal(n) * 0.3
            spectrum = np.fft.rfft(excitation)
            freqs = np.fft.rfftfreq(n, 1 / RATE)
            formants = [(rng.uniform(300, 900), 80.0), (rng.uniform(900, 2300), 120.0),
                        (rng.uniform(2300, 3300), 180.0)]
            shaped = np.fft.irfft(spectrum * _formant_gain(freqs, formants), n)
            envelope = np.sin(np.pi * np.arange(n) / n) ** 2  # syllable-rate AM
            out[pos:pos + n] = shaped * envelope * rng.uniform(0.3, 1.0)
            pos += n
        pos += int(rng.uniform(0.2, 1.5) * RATE)
    out *= 9000 / max(1e-9, float(np.percentile(np.abs(out), 99.5)))
    out += rng.standard_normal(total) * 8  # line noise floor, about -72 dBFS
    return np.clip(out, -32768, 32767).astype(np.int16)


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def run(minutes: float) -> dict[str, Any]:
    pcm = synth_speech(minutes * 60)
    chunks = [pcm[i:i + SEGMENT_SECONDS * RATE] for i in range(0, pcm.size, SEGMENT_SECONDS * RATE)]
    seconds = pcm.size / RATE
    hour_scale = 3600 / seconds
    key = DeviceKey.generate()
    _, recipient = generate_age_identity()
    rcpt = pyrage.x25519.Recipient.from_str(recipient)
    results: dict[str, Any] = {"audio_seconds": seconds, "segment_seconds": SEGMENT_SECONDS,
                               "rate": RATE, "codecs": {}}
    for codec in CODECS:
        encoded, codec_cpu = _timed(lambda c=codec: [encode_audio(x, RATE, c) for x in chunks])
        _, age_cpu = _timed(lambda e=encoded: [pyrage.encrypt(b, [rcpt]) for b in e])

        def seal_all(c: str = codec) -> list[int]:
            prev: str | None = None
            sizes = []
            for seq, chunk in enumerate(chunks):
                inp = SegmentInput(line="line-1", call_id="call-1", part=seq,
                                   last_part=seq == len(chunks) - 1,
                                   start_frame=seq * SEGMENT_SECONDS * RATE,
                                   start_wall_ns=1_700_000_000_000_000_000, rate=RATE, pcm=chunk,
                                   sensitive={"dtmf": "12345678"}, gaps=[])
                seg = seal_segment(inp, device_id="bench", seq=seq, prev_manifest_sha256=prev,
                                   recipients=[recipient], key=key, codec=c)
                prev = seg.manifest_sha256
                sizes.append(len(seg.payload) + len(seg.signed_manifest_json()))
            return sizes

        sealed_sizes, seal_cpu = _timed(seal_all)
        audio_bytes = sum(len(b) for b in encoded)
        results["codecs"][codec] = {
            "audio_bytes_per_channel_hour": round(audio_bytes * hour_scale),
            "sealed_bytes_per_channel_hour": round(sum(sealed_sizes) * hour_scale),
            "codec_channel_s_per_cpu_s": round(seconds / max(codec_cpu, 1e-9), 1),
            "age_channel_s_per_cpu_s": round(seconds / max(age_cpu, 1e-9), 1),
            "seal_channel_s_per_cpu_s": round(seconds / max(seal_cpu, 1e-9), 1),
            "codec_cpu_s": round(codec_cpu, 4),
            "age_cpu_s": round(age_cpu, 4),
            "seal_cpu_s": round(seal_cpu, 4),
            "ratio_seal_over_codec_plus_age": round(seal_cpu / max(codec_cpu + age_cpu, 1e-9), 3),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="minutes of synthetic speech per codec (default 5)")
    args = parser.parse_args(argv)
    results = run(args.minutes)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print(f"{results['audio_seconds']:.0f} s of 8 kHz speech in {SEGMENT_SECONDS} s segments")
        print(f"{'codec':9} {'MB/ch-h':>8} {'sealed MB/ch-h':>15} {'codec x':>9} {'age x':>9} "
              f"{'seal x':>9} {'ratio':>6}")
        for codec, r in results["codecs"].items():
            print(f"{codec:9} {r['audio_bytes_per_channel_hour'] / 1e6:8.2f} "
                  f"{r['sealed_bytes_per_channel_hour'] / 1e6:15.2f} "
                  f"{r['codec_channel_s_per_cpu_s']:9.0f} {r['age_channel_s_per_cpu_s']:9.0f} "
                  f"{r['seal_channel_s_per_cpu_s']:9.0f} "
                  f"{r['ratio_seal_over_codec_plus_age']:6.2f}")
        print(f"('x' = channel-seconds per CPU-second; ratio = seal / (codec + age), "
              f"target <= {TARGET_RATIO})")
    worst = max(r["ratio_seal_over_codec_plus_age"] for r in results["codecs"].values())
    return 0 if worst <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
