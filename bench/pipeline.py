"""Whole-pipeline throughput on a file source, against the FLAC encoder alone.

Runs the box's capture and recorder+sealer stages as real processes on a WAV file (no pacing,
uplink off), and reports channel-seconds of audio processed per CPU-second of those processes
(user + system, from the kernel's accounting of the children), next to the same figure for the
FLAC encoder alone on the same audio, measured in the same run.

    python bench/pipeline.py [--seconds 300] [--lines 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from appliance.audio.simulator import LineSimulator
from linerec_contract.codec import encode_audio
from linerec_contract.identity import DeviceKey, generate_age_identity

RATE = 8000


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_pipeline(folder: Path, wav: Path, lines: int, seconds: float) -> tuple[float, int]:
    _, recipient = generate_age_identity()
    DeviceKey.load_or_create(folder / "state" / "keys" / "device.key")
    cfg = folder / "appliance.toml"
    cfg.write_text(f"""
[device]
id = "bench-box"
[paths]
state_dir = "{folder / 'state'}"
[[capture]]
source = "wav"
wav_path = "{wav}"
realtime = false
[ring]
size_mb = {max(16, int(lines * seconds * RATE * 2 / 2**20) + 8)}
[seal]
recipients = ["{recipient}"]
[uplink]
transport = "none"
""")
    base = [sys.executable, "-m", "appliance", "stage"]
    before = children_cpu()
    cap = subprocess.run([*base, "capture", "main", "--config", str(cfg)], check=True,
                         capture_output=True)
    del cap
    rec = subprocess.Popen([*base, "recorder", "--config", str(cfg)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = folder / "state" / "run" / "recorder.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            continue
        if st.get("caught_up"):
            break
    rec.terminate()
    rec.wait()
    sealed = len(list((folder / "state" / "outbox").glob("seg-*.seg")))
    return children_cpu() - before, sealed


def flac_alone(audio: np.ndarray) -> float:
    start = time.process_time()
    for ch in range(audio.shape[1]):
        encode_audio(np.ascontiguousarray(audio[:, ch]), RATE, "flac")
    return time.process_time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--lines", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sim = LineSimulator(args.lines, RATE, seed=3, mean_idle_s=6.0, mean_call_s=30.0)
    audio = sim.render(0, int(args.seconds * RATE))
    channel_seconds = args.seconds * args.lines
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wav = folder / "lines.wav"
        soundfile.write(wav, audio, RATE, subtype="PCM_16")
        cpu, sealed = run_pipeline(folder, wav, args.lines, args.seconds)
    flac_cpu = flac_alone(audio)
    result = {
        "audio_channel_seconds": channel_seconds,
        "segments_sealed": sealed,
        "pipeline_cpu_s": round(cpu, 3),
        "pipeline_channel_s_per_cpu_s": round(channel_seconds / cpu, 1),
        "flac_alone_cpu_s": round(flac_cpu, 3),
        "flac_alone_channel_s_per_cpu_s": round(channel_seconds / max(flac_cpu, 1e-9), 1),
        "pipeline_cost_vs_flac_alone": round(cpu / max(flac_cpu, 1e-9), 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("pipeline on a file source (capture + ring + detection + FLAC + age + sign + outbox)")
        for key, value in result.items():
            print(f"  {key:<34} {value}")
        print("  (pipeline_cost_vs_flac_alone includes Python start-up of two processes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
