"""``appliance analyze FILE.wav``: the recorder's detection over a WAV file, one line per channel.

Runs what the recorder runs on each line (call detection, DTMF, call-progress tones, caller ID,
PCI masking spans, busy/reorder ending a call) with the settings of ``[recorder]`` and prints
the calls and events. Nothing is stored. Digits are printed only when masking is off for the
line (as the recorder would keep them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Config
from appliance.recorder.detect import CALL_DISCARD, CALL_END, CALL_START, DetectorEvent
from appliance.recorder.lines import LineState, line_setup
from linerec_contract.errors import FormatError

BLOCK_S = 1.0


@dataclass
class LineReport:
    line: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(frames x channels int16 at 8000 or 16000 Hz, rate); other rates are resampled to 8000."""
    data, rate, _ = read_wav_with_rate(path)
    return data, rate


def read_wav_with_rate(path: Path) -> tuple[np.ndarray, int, int]:
    """Like :func:`read_wav`, plus the file's own rate."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    except (RuntimeError, OSError, ValueError) as err:
        # soundfile raises LibsndfileError (a RuntimeError) for unreadable or non-audio files.
        raise FormatError(f"{path}: not a readable WAV file ({str(err).splitlines()[0][:120]}); "
                          "accepted: a PCM WAV file") from err
    file_rate = int(rate)
    if rate not in (8000, 16000):
        import soxr

        out = soxr.resample(data.astype(np.float32) / 32768.0, rate, 8000)
        data = np.clip(np.rint(np.asarray(out) * 32768.0), -32768, 32767).astype(np.int16)
        rate = 8000
    return np.ascontiguousarray(data), int(rate), file_rate


def analyze_line(cfg: Config, line_id: str, channel: int, x: np.ndarray, rate: int) -> LineReport:
    setup = line_setup(cfg.recorder, line_id, rate)
    ln = LineState.new(line_id, channel, setup)
    rep = LineReport(line_id)
    step = round(BLOCK_S * rate)
    call_start: int | None = None

    def on_event(ev: DetectorEvent) -> None:
        nonlocal call_start
        if ev.kind == CALL_START:
            call_start = ev.frame
        elif ev.kind in (CALL_END, CALL_DISCARD) and call_start is not None:
            if ev.kind == CALL_END:
                rep.calls.append({"line": line_id, "start_s": round(call_start / rate, 3),
                                  "end_s": round(ev.frame / rate, 3)})
            call_start = None

    for start in range(0, x.shape[0], step):
        block = np.ascontiguousarray(x[start:start + step])
        an = ln.analyzer.process(start, block)
        a = start
        end = start + block.shape[0]
        for frame, action, tone_start in [*an.controls, (end, "", 0)]:
            frame = min(max(frame, a), end)
            if frame > a:
                for ev in ln.detector.process(a, block[a - start:frame - start]):
                    on_event(ev)
                a = frame
            if action == "end_call" or (action == "tone_over" and ln.detector.in_call and
                                        ln.detector.voice_start >= tone_start - setup.detector.frame_len):
                forced = ln.detector.force_end(frame, tone_start)
                if forced is not None:
                    on_event(forced)
        rep.events.extend(an.events)
        ln.health.measure(block)
    rep.events.extend(ln.analyzer.finish(x.shape[0]))
    ln.analyzer.end_pause(x.shape[0])
    if call_start is not None:
        rep.calls.append({"line": line_id, "start_s": round(call_start / rate, 3),
                          "end_s": round(x.shape[0] / rate, 3), "open_at_end": True})
    rep.events = [_event_out(e, line_id, rate) for e in rep.events]
    rep.events.extend(_event_out(e, line_id, rate) for e in ln.analyzer.recent
                      if e["kind"] == "pause" and _event_out(e, line_id, rate) not in rep.events)
    rep.health = ln.health.report(ln.detector.noise_floor_db)
    return rep


def _event_out(e: dict[str, Any], line: str, rate: int) -> dict[str, Any]:
    out: dict[str, Any] = {"line": line, "kind": e["kind"], "t_s": round(e["frame"] / rate, 3)}
    if e.get("end") is not None:
        out["end_s"] = round(e["end"] / rate, 3)
    out.update({k: v for k, v in e.items() if k not in ("kind", "frame", "end", "at", "since")})
    return out


def analyze(cfg: Config, path: Path) -> dict[str, Any]:
    x, rate, file_rate = read_wav_with_rate(path)
    lines = cfg.capture[0].line_ids(x.shape[1], single_stream=True)
    reports = [analyze_line(cfg, lid, ch, x[:, ch], rate) for ch, lid in enumerate(lines)]
    return {
        "file": str(path),
        "rate": rate,
        "file_rate": file_rate,
        "seconds": round(x.shape[0] / rate, 3),
        "calls": sorted((c for r in reports for c in r.calls), key=lambda c: (c["start_s"], c["line"])),
        "events": sorted((e for r in reports for e in r.events), key=lambda e: (e["t_s"], e["line"])),
        "health": {r.line: r.health for r in reports},
    }


def health_line(line: str, h: dict[str, Any]) -> str:
    """One line of a channel's health, with the self-test's limits flagged."""
    from appliance.selftest.audio import DC_WARN, HUM_WARN_DBM0
    from appliance.selftest.signal import dbfs

    flags = []
    if h["clipped_samples"]:
        flags.append("CLIPPING")
    if h["hum_dbfs"] > dbfs(HUM_WARN_DBM0):
        flags.append(f"HUM {h['hum_hz']} Hz")
    if abs(h["dc_offset"]) >= DC_WARN:
        flags.append("DC OFFSET")
    if h["peak_dbfs"] <= -90.3:
        flags.append("NO SIGNAL")
    return (f"health {line:<6} floor {h['noise_floor_db']:6.1f} dBFS  peak {h['peak_dbfs']:6.1f} dBFS  "
            f"clipped {h['clipped_samples']}  DC {h['dc_offset'] * 100:.2f} %  "
            f"hum {h['hum_hz']} Hz {h['hum_dbfs']:6.1f} dBFS  {' '.join(flags) or 'ok'}")


def analyze_command(cfg: Config, path: Path, *, as_json: bool) -> int:
    if not path.is_file():
        raise FormatError(f"{path}: no such file; accepted: a PCM WAV file")
    result = analyze(cfg, path)
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    resampled = (f" (analysed at {result['rate']} Hz)"
                 if result["file_rate"] != result["rate"] else "")
    print(f"{result['file']}: {result['seconds']} s at {result['file_rate']} Hz{resampled}, "
          f"{len(result['health'])} line(s), {len(result['calls'])} call(s)")
    for line, h in result["health"].items():
        print(health_line(line, h))
    for c in result["calls"]:
        note = " (still open at the end)" if c.get("open_at_end") else ""
        print(f"call  {c['line']:<6} {c['start_s']:>10.3f} s .. {c['end_s']:>10.3f} s{note}")
    for e in result["events"]:
        detail = " ".join(f"{k}={v}" for k, v in sorted(e.items()) if k not in ("line", "kind", "t_s"))
        print(f"event {e['line']:<6} {e['t_s']:>10.3f} s  {e['kind']:<12} {detail}")
    return 0
