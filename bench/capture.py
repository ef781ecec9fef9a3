"""CPU cost of capture: 48 kHz S32_LE in, 8 kHz int16 into the ring journal.

The full path is measured through the real libasound: a file-backed ALSA PCM (the ``file``
plugin reading a raw S32_LE file over a ``null`` slave, defined in a private
ALSA_CONFIG_PATH) -> AlsaSource (decode, resample with libsoxr HQ) -> CaptureLoop -> RingWriter
(pwrite + fdatasync every 500 ms) in a temporary folder. The file PCM never blocks, so the
loop runs flat out and the process CPU time (user + system) is the cost of the audio it moved.

Reference measured in the same run: the resampler alone (libsoxr on the same float32 periods),
so the table shows what capture adds on top of the one unavoidable DSP step.

    .venv/bin/python bench/capture.py [--seconds 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HOUR = 3600.0
IN_RATE = 48000
STORAGE = 8000
PERIOD_MS = 20


def _alsa_conf(folder: Path) -> Path:
    conf = folder / "asound.conf"
    conf.write_text("""
pcm.filecap {
  @args [ FILE ]
  @args.FILE { type string default "/dev/zero" }
  type file
  slave.pcm { type null }
  file "/dev/null"
  infile $FILE
  format "raw"
}
""")
    return conf


def _signal(channels: int, seconds: float) -> np.ndarray:
    t = np.arange(int(IN_RATE * seconds), dtype=np.float64) / IN_RATE
    rng = np.random.default_rng(1)
    cols = [0.3 * np.sin(2 * np.pi * (300 + 150 * c) * t) + 0.01 * rng.standard_normal(t.size)
            for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def bench_capture(folder: Path, raw: Path, channels: int, seconds: float) -> dict[str, float]:
    from appliance.audio.alsa import AlsaSource
    from appliance.audio.source import Block, CaptureSource, SourceExhausted
    from appliance.buffer import RingWriter
    from appliance.capture import CaptureLoop
    from appliance.config import CaptureSection

    class Bounded(CaptureSource):
        """The ALSA source, ended after ``seconds`` of audio (the file PCM never ends)."""

        def __init__(self, inner: AlsaSource, frames: int) -> None:
            self.inner, self.frames = inner, frames
            self.channels, self.storage_rate = channels, STORAGE
            self.description = inner.description
            self.live = True

        def open(self, start_frame: int) -> None:
            self.inner.open(start_frame)

        def read(self) -> Block:
            blk = self.inner.read()
            if blk.frame_pos >= self.frames:
                raise SourceExhausted("done")
            return blk

        def close(self) -> None:
            self.inner.close()

    section = CaptureSection.model_validate({
        "device": f"filecap:FILE={raw}", "channels": channels, "rate": IN_RATE,
        "sample_format": "S32_LE", "rt_priority": 0})
    src = AlsaSource(section.device, storage_rate=STORAGE, channels=channels, rate=IN_RATE,
                     sample_format="S32_LE", period_ms=PERIOD_MS)
    ring = folder / f"bench-{channels}.ring"
    with RingWriter.open(ring, stream_id=1, size_bytes=64 << 20, sync_interval_s=0.5) as writer:
        loop = CaptureLoop(section, Bounded(src, int(seconds * STORAGE)), writer,
                           status_path=None)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        loop.run(threading.Event())
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    audio_s = loop.stats.frames / STORAGE
    ring.unlink()
    return {"cpu_s": cpu, "wall_s": wall, "audio_s": audio_s,
            "records": float(loop.stats.records)}


def bench_resampler(data: np.ndarray) -> dict[str, float]:
    from appliance.audio.convert import StreamResampler

    channels = data.shape[1]
    period = IN_RATE * PERIOD_MS // 1000
    rs = StreamResampler(IN_RATE, STORAGE, channels)
    out = 0
    cpu0 = time.process_time()
    for i in range(0, data.shape[0], period):
        out += rs.process(data[i:i + period]).shape[0]
    out += rs.flush().shape[0]
    cpu = time.process_time() - cpu0
    return {"cpu_s": cpu, "audio_s": data.shape[0] / IN_RATE, "out_frames": float(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="audio per configuration")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from appliance.audio.convert import encode

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        folder = Path(tmp)
        os.environ["ALSA_CONFIG_PATH"] = str(_alsa_conf(folder))
        for channels in (8, 16):
            data = _signal(channels, args.seconds + 1.0)
            raw = folder / f"in-{channels}.raw"
            raw.write_bytes(encode(data, "S32_LE"))
            cap = bench_capture(folder, raw, channels, args.seconds)
            rs = bench_resampler(data[: int(args.seconds * IN_RATE)])
            ch_hours = channels * cap["audio_s"] / HOUR
            rs_ch_hours = channels * rs["audio_s"] / HOUR
            results.append({
                "channels": channels,
                "in": f"{IN_RATE} Hz S32_LE", "out": f"{STORAGE} Hz S16_LE",
                "audio_s": round(cap["audio_s"], 3),
                "capture_cpu_s_per_channel_hour": round(cap["cpu_s"] / ch_hours, 3),
                "resampler_cpu_s_per_channel_hour": round(rs["cpu_s"] / rs_ch_hours, 3),
                "capture_over_resampler": round(
                    (cap["cpu_s"] / ch_hours) / max(1e-9, rs["cpu_s"] / rs_ch_hours), 2),
                "capture_cpu_fraction_of_one_core": round(cap["cpu_s"] / cap["audio_s"], 5),
                "records": int(cap["records"]),
                "path": "file-backed ALSA PCM -> AlsaSource -> CaptureLoop -> RingWriter",
            })
            raw.unlink()
    if args.json:
        print(json.dumps({"benchmark": "capture", "results": results}, indent=2))
    else:
        print(f"{'ch':>3} {'capture cpu s/ch-h':>19} {'resampler cpu s/ch-h':>21} "
              f"{'ratio':>6} {'1-core load':>11}")
        for r in results:
            print(f"{r['channels']:>3} {r['capture_cpu_s_per_channel_hour']:>19.2f} "
                  f"{r['resampler_cpu_s_per_channel_hour']:>21.2f} "
                  f"{r['capture_over_resampler']:>6.2f} "
                  f"{r['capture_cpu_fraction_of_one_core'] * 100:>10.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
