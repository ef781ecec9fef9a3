"""The box at real time: CPU of every stage while N lines are captured, paced like a device.

Runs ``appliance run`` (the supervisor and its stage processes: capture, recorder+sealer,
uplink with ``transport = "none"``) on a WAV file paced in real time (``realtime = true``: a
box has no simulator, so the audio is rendered beforehand and its synthesis is not counted),
once with every line idle (line noise and hum) and once with every line in a call (speech
on every line for the whole run, a few DTMF digits), and reads each process's CPU time (user +
system, its waited-for children included) from /proc after a warm-up. It prints
channel-seconds of audio per CPU-second of all stages together, next to two references
measured in the same run: the unpaced pipeline (``bench/pipeline.py``'s measure: a WAV file
fed as fast as possible) and the FLAC encoder alone on the same audio.

    python bench/realtime.py [--lines 16] [--seconds 30] [--warmup 10] [--codec flac]
                             [--opus-complexity 5] [--json]

Calls are cut into parts of ``--part-s`` seconds (default 30, a tenth of the product's
``max_segment_s``) so that every line seals one part inside a 30 s window: the sealing cost
is counted at ten times the rate a box with default settings pays. The machine may be
shared: ``loadavg`` before and after is printed, and FLAC alone, measured in the same run,
shows how fast the machine was. With ``--codec opus`` the run also measures Opus alone on the
same audio: through libopus at ``--opus-complexity`` (as the box seals it) and through
libsndfile (complexity 10, the fallback where libopus cannot be loaded).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import flac_alone, run_pipeline  # noqa: E402

from appliance.audio import dtmf  # noqa: E402
from appliance.audio.simulator import LineSimulator  # noqa: E402
from linerec_contract.codec import encode_audio  # noqa: E402
from linerec_contract.identity import DeviceKey, generate_age_identity  # noqa: E402

RATE = 8000
TICK = os.sysconf("SC_CLK_TCK")


def idle_lines(lines: int, seconds: float, seed: int = 1) -> np.ndarray:
    """Line noise (-65 dBFS) and 50 Hz hum (-75 dBFS) on every line: no calls."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    hum = 10 ** (-75 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 50 * t)
    out = np.empty((n, lines), dtype=np.int16)
    for ch in range(lines):
        x = rng.standard_normal(n) * 10 ** (-65 / 20) + hum
        out[:, ch] = np.clip(np.rint(x * 32768), -32768, 32767)
    return out


def busy_lines(lines: int, seconds: float, seed: int = 2) -> np.ndarray:
    """Every line in a call for the whole run: band-limited speech-like noise in syllables
    (pauses shorter than the stop delay), a few DTMF digits every 20 s."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    base = idle_lines(lines, seconds, seed).astype(np.float64) / 32768.0
    f = np.fft.rfftfreq(n, 1.0 / RATE)
    band = (f >= 300) & (f <= 3400)
    out = np.empty((n, lines), dtype=np.int16)
    for ch in range(lines):
        spec = np.fft.rfft(rng.standard_normal(n))
        spec[~band] = 0.0
        x = np.fft.irfft(spec, n)
        x *= 10 ** (-20 / 20) / max(float(np.std(x)), 1e-12)
        env = np.zeros(n)
        pos = int(rng.uniform(0, 0.3) * RATE)
        while pos < n:
            on = int(rng.uniform(0.15, 0.4) * RATE)
            env[pos:pos + on] = 1.0
            pos += on + int(rng.uniform(0.05, 0.6) * RATE)
        x = x * env + base[:, ch]
        for at in range(int(5 * RATE) + ch * 400, n - RATE, 20 * RATE):
            digits = dtmf.sequence("1234", RATE, level_dbfs=-15.0)
            x[at:at + digits.size] = digits + base[at:at + digits.size, ch]
        out[:, ch] = np.clip(np.rint(x * 32768), -32768, 32767)
    return out


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process: user + system, and its children that were waited for."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / TICK


def stage_pids(supervisor: int) -> dict[str, int]:
    """The supervisor and its stage processes, by stage name."""
    out = {"supervisor": supervisor}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != supervisor:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        words = [a.decode() for a in argv if a]
        if "stage" in words:
            i = words.index("stage")
            out["-".join(words[i + 1:i + 3 if words[i + 1] == "capture" else i + 2])] = int(entry)
    return out


def sample(pids: dict[str, int]) -> dict[str, float]:
    return {name: proc_cpu(pid) for name, pid in pids.items()}


def write_config(folder: Path, wav: Path, lines: int, seconds: float, codec: str,
                 part_s: float, period_ms: int, opus_complexity: int = 5) -> Path:
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
realtime = true
rt_priority = 0
{f"period_ms = {period_ms}" if period_ms else ""}
[ring]
size_mb = {max(16, int(lines * seconds * RATE * 2 * 1.2 / 2**20) + 8)}
[recorder]
max_segment_s = {part_s}
[seal]
recipients = ["{recipient}"]
codec = "{codec}"
opus_complexity = {opus_complexity}
[uplink]
transport = "none"
""")
    return cfg


def run_paced(audio: np.ndarray, warmup: float, seconds: float, codec: str,
              part_s: float, period_ms: int = 0, opus_complexity: int = 5) -> dict[str, Any]:
    lines = audio.shape[1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wav = folder / "lines.wav"
        soundfile.write(wav, audio, RATE, subtype="PCM_16")
        cfg = write_config(folder, wav, lines, audio.shape[0] / RATE, codec, part_s, period_ms,
                           opus_complexity)
        sup = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(warmup)
            pids = stage_pids(sup.pid)
            missing = {"capture-main", "recorder", "uplink"} - set(pids)
            if missing:
                raise SystemExit(f"stage processes not running after the warm-up: {sorted(missing)}")
            t0, c0 = time.monotonic(), sample(pids)
            time.sleep(seconds)
            t1, c1 = time.monotonic(), sample(pids)
            status = json.loads((folder / "state" / "run" / "recorder.json").read_text())
            capture = json.loads((folder / "state" / "run" / "capture-main.json").read_text())
        finally:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(30)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()
        sealed = len(list((folder / "state" / "outbox").glob("seg-*.seg")))
    wall = t1 - t0
    cpu = {name: round(c1[name] - c0[name], 3) for name in c0}
    total = sum(cpu.values())
    channel_s = lines * wall
    return {
        "wall_s": round(wall, 2),
        "channel_s": round(channel_s, 1),
        "cpu_s": cpu,
        "cpu_s_total": round(total, 3),
        "pct_of_one_core": round(100.0 * total / wall, 2),
        "channel_s_per_cpu_s": round(channel_s / max(total, 1e-9), 1),
        "lines_in_call_at_end": sum(1 for ln in status["lines"] if ln["in_call"]),
        # Records the recorder had still to read (capture writes its status every second and
        # the recorder reads every read_interval_s, so a few dozen are normal).
        "recorder_lag_records": int(capture["records"]) - int(status["cursors"]["main"]),
        "segments_sealed": sealed,
    }


def opus_alone(audio: np.ndarray, complexity: int) -> tuple[float, float]:
    """CPU seconds to encode every line as Opus at 16 kbit/s: (libopus at ``complexity``,
    libsndfile)."""
    start = time.process_time()
    for ch in range(audio.shape[1]):
        encode_audio(np.ascontiguousarray(audio[:, ch]), RATE, "opus", opus_complexity=complexity)
    direct = time.process_time() - start
    start = time.process_time()
    for ch in range(audio.shape[1]):
        with soundfile.SoundFile(io.BytesIO(), "w", RATE, 1, format="OGG", subtype="OPUS") as out:
            out.write(np.ascontiguousarray(audio[:, ch]))
    return direct, time.process_time() - start


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window after warm-up")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--codec", choices=("flac", "opus"), default="flac")
    ap.add_argument("--opus-complexity", type=int, default=5, help="seal.opus_complexity")
    ap.add_argument("--part-s", type=float, default=30.0, help="recorder.max_segment_s")
    ap.add_argument("--period-ms", type=int, default=0,
                    help="capture.period_ms (default: the configuration's default)")
    ap.add_argument("--unpaced-seconds", type=float, default=60.0,
                    help="audio length of the unpaced pipeline reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.lines <= 64 or args.seconds <= 0 or args.warmup < 2 or \
            not 0 <= args.opus_complexity <= 10:
        print("bench/realtime.py: --lines 1..64, --seconds > 0, --warmup >= 2, "
              "--opus-complexity 0..10", file=sys.stderr)
        return 2
    length = args.warmup + args.seconds + 10.0
    load_before = loadavg()
    result: dict[str, Any] = {"lines": args.lines, "codec": args.codec, "part_s": args.part_s,
                              "warmup_s": args.warmup, "period_ms": args.period_ms or "default"}
    if args.codec == "opus":
        result["opus_complexity"] = args.opus_complexity
    for mode, render in (("idle", idle_lines), ("busy", busy_lines)):
        audio = render(args.lines, length)
        result[mode] = run_paced(audio, args.warmup, args.seconds, args.codec, args.part_s,
                                 args.period_ms, args.opus_complexity)
    # References in the same run: the unpaced pipeline and FLAC alone on simulator lines.
    sim = LineSimulator(args.lines, RATE, seed=3, mean_idle_s=6.0, mean_call_s=30.0)
    ref_audio = sim.render(0, int(args.unpaced_seconds * RATE))
    ref_cs = args.unpaced_seconds * args.lines
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "lines.wav"
        soundfile.write(wav, ref_audio, RATE, subtype="PCM_16")
        cpu, _ = run_pipeline(Path(tmp), wav, args.lines, args.unpaced_seconds)
    flac_cpu = flac_alone(ref_audio)
    result["unpaced_pipeline_channel_s_per_cpu_s"] = round(ref_cs / cpu, 1)
    result["flac_alone_channel_s_per_cpu_s"] = round(ref_cs / max(flac_cpu, 1e-9), 1)
    if args.codec == "opus":
        direct, libsndfile = opus_alone(ref_audio, args.opus_complexity)
        result["opus_alone_channel_s_per_cpu_s"] = round(ref_cs / max(direct, 1e-9), 1)
        result["opus_libsndfile_alone_channel_s_per_cpu_s"] = round(ref_cs / max(libsndfile, 1e-9), 1)
    result["loadavg_before_after"] = [load_before, loadavg()]
    result["cpus"] = os.cpu_count()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"box at real time: {args.lines} lines, paced WAV source, uplink off, codec {args.codec}")
    for mode in ("idle", "busy"):
        r = result[mode]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items())
        print(f"  {mode:<5} {r['channel_s_per_cpu_s']:>8} channel-s per CPU-s "
              f"({r['pct_of_one_core']} % of one core; CPU s over {r['wall_s']} s: {stages})")
    print(f"  unpaced pipeline   {result['unpaced_pipeline_channel_s_per_cpu_s']} channel-s per CPU-s")
    print(f"  FLAC alone         {result['flac_alone_channel_s_per_cpu_s']} channel-s per CPU-s")
    if args.codec == "opus":
        print(f"  Opus alone         {result['opus_alone_channel_s_per_cpu_s']} channel-s per CPU-s "
              f"(complexity {args.opus_complexity}); through libsndfile "
              f"{result['opus_libsndfile_alone_channel_s_per_cpu_s']}")
    print(f"  loadavg before/after {result['loadavg_before_after']} on {result['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
