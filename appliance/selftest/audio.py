"""Audio checks: the capture devices against the config, each line's signal, and the loopback
test through the test plug.

Limits (each stated with where it comes from; hw-tests/CHECKS.md is the technician's copy):

- signal present: a connected analogue input always carries its own noise, well above one
  step of the stored 16-bit signal (-90.3 dBFS RMS); below that the channel is digital silence.
- noise floor: ITU-T G.712 allows -65 dBm0p idle-channel noise on a PCM voice channel (PASS up to
  there). Calls are found where speech stands the recorder's ``threshold_db`` above the floor;
  a quiet talker is at -30 dBm0 (ITU-T P.56 puts the usual active level near -20 to -26 dBm0),
  so a floor above -30 dBm0 - threshold_db hides quiet calls (FAIL).
- mains hum (50/60 Hz): above the G.712 idle-noise limit it is a ground loop (WARN); above
  -45 dBm0 its harmonics reach the voice band at levels people hear and it masks quiet speech.
- DC offset: a line input is AC-coupled and reads none; 1 % of full scale points at a leaking
  coupling capacitor or a DC path from the loop feed (WARN), 5 % costs headroom and is a fault.
- clipping: a stored sample at full scale is a flat top; more than 1 in 10,000 samples is
  audible distortion on speech (FAIL), any is worth a gain check (WARN).
- level during a call: ITU-T P.56 / G.223 put speech on a telephone channel near -20 dBm0;
  PASS within -35..-10 dBm0, WARN outside (too quiet to follow, or near overload).
- loopback (as ``alsabat`` does): a 1004 Hz tone (the telephone test tone, IEEE 743) at -10 dBm0
  played through the plug must come back on the plugged line, at that frequency within 0.5 %
  (WARN to 2 %: playback and capture clocks disagree), at least 30 dB above everything else;
  WARN when it returns weaker than -40 dBFS or also on another line (crosstalk).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from appliance.audio import alsa
from appliance.audio.source import AudioError, check_line_map
from appliance.config import CaptureSection
from appliance.selftest.context import Context, Take, capture_status, capture_take, journal_take
from appliance.selftest.model import CheckResult, Verdict, grade
from appliance.selftest.signal import ACTIVE_FRACTION, LineMeasures, dbfs, dbm0, dominant_tone
from linerec_contract.errors import ApplianceError

log = logging.getLogger(__name__)

SILENCE_DBFS = -90.3
NOISE_PASS_DBM0 = -65.0
QUIET_TALKER_DBM0 = -30.0
HUM_WARN_DBM0 = -65.0
HUM_FAIL_DBM0 = -45.0
DC_WARN = 0.01
DC_FAIL = 0.05
CLIP_FAIL_FRACTION = 1e-4
CALL_LOW_DBM0 = -35.0
CALL_HIGH_DBM0 = -10.0
TONE_HZ = 1004.0
TONE_DBM0 = -10.0
FREQ_PASS = 0.005
FREQ_FAIL = 0.02
TONE_SNR_DB = 30.0
TONE_LOW_DBFS = -40.0
"""A test tone returned 24 dB below what was played leaves little room above the line's noise:
the plug path attenuates too much or the input gain is too low (WARN)."""


def _streams(ctx: Context) -> list[CaptureSection]:
    return list(ctx.cfg.capture)


def check_capture_device(ctx: Context) -> list[CheckResult]:
    return [_device_result(ctx, s) for s in _streams(ctx)]


def _device_result(ctx: Context, s: CaptureSection) -> CheckResult:
    def res(verdict: Verdict, value: str | None, hint: str, detail: str = "") -> CheckResult:
        return CheckResult("capture-device", s.name, verdict, value, "", limits, hint, detail)

    want = (f"{s.channels} ch" if s.channels else "every channel") + (f" at {s.rate} Hz" if s.rate else "")
    limits = f"device {s.device!r} opens with the configured {want}, format {s.sample_format}"
    status = capture_status(ctx.cfg, s)
    if status is not None:
        return _running_device_result(ctx, s, status, limits)
    if s.source in ("wav", "simulator"):
        return res(Verdict.SKIP, s.source, f"stream {s.name} reads a {s.source} source, not "
                   "hardware: set capture.source = 'alsa' on a box")
    if s.source == "alsa":
        try:
            name = alsa.resolve_device(s.device)
        except AudioError as err:
            return res(Verdict.FAIL, "no sound card",
                       "no sound card found: check the audio interface's USB cable and power, "
                       "then run 'appliance devices'", str(err))
        try:
            caps = alsa.probe(name)
        except AudioError as err:
            return res(Verdict.FAIL, "missing",
                       f"capture device {name!r} not found: check the interface is plugged in and "
                       "capture.device names it (see 'appliance devices')", str(err))
        try:
            choice = alsa.choose(caps, fmt=s.sample_format, channels=s.channels, rate=s.rate,
                                 storage_rate=s.storage_rate)
            check_line_map(s, choice.channels)
        except ApplianceError as err:
            hint = (f"{name} offers {caps.describe_channels()} channel(s), rates "
                    f"{caps.describe_rates()}: set capture.channels/rate/sample_format to match "
                    "or connect the interface the config was written for")
            return res(Verdict.FAIL, f"{caps.describe_channels()} ch", hint, str(err))
    take = ctx.take(s)
    if take.pcm is None:
        return res(Verdict.FAIL, "no audio", f"stream {s.name} delivers no audio: check that no "
                   "other program holds the device (stop 'appliance run') and see "
                   "'appliance devices'", take.error)
    value = f"{take.pcm.shape[1]} ch"
    if take.lost_frames:
        return res(Verdict.WARN, value, "audio was lost to overruns while testing: the box is "
                   "overloaded or the USB link is unreliable (try another port or cable)",
                   f"{take.lost_frames} frames lost; {take.description}")
    return res(Verdict.PASS, value, "", take.description)


def _running_device_result(ctx: Context, s: CaptureSection, status: dict[str, Any],
                           limits: str) -> CheckResult:
    """The device is held by the running capture stage: judge it by what capture reports and
    by the audio in its journal."""
    source = str(status.get("source", s.device))
    device = status.get("device") if isinstance(status.get("device"), dict) else {}
    state = str(device.get("state", "ok")) if isinstance(device, dict) else "ok"
    if state != "ok":
        error = str(device.get("error", "")) if isinstance(device, dict) else ""
        return CheckResult("capture-device", s.name, Verdict.FAIL, state, "", limits,
                           "the capture stage has lost the device: check the interface's cable "
                           "and power, then 'journalctl -u appliance-capture@*'", error)
    take = ctx.take(s)
    if take.pcm is None:
        return CheckResult("capture-device", s.name, Verdict.FAIL, "no audio", "", limits,
                           "the capture stage runs but its journal holds no audio: see "
                           "'appliance status'", take.error)
    got = take.pcm.shape[1]
    if s.channels and got != s.channels:
        return CheckResult("capture-device", s.name, Verdict.FAIL, f"{got} ch", "", limits,
                           f"capture records {got} channel(s), the config asks for {s.channels}: "
                           "restart the capture stage after changing capture.channels")
    return CheckResult("capture-device", s.name, Verdict.PASS, f"{got} ch", "", limits, "",
                       f"in use by the capture stage: {source}")


def _lines(ctx: Context, check: str) -> Iterator[tuple[str, str, LineMeasures] | CheckResult]:
    """(where, line id, measures) for every line, or a FAIL per stream without audio."""
    for s in _streams(ctx):
        take = ctx.take(s)
        if take.pcm is None:
            yield CheckResult(check, s.name, Verdict.FAIL, None, "", "needs audio from the stream",
                              f"no audio from stream {s.name}, so its lines cannot be checked: "
                              "fix capture-device first", take.error)
            continue
        for ch, line in enumerate(take.line_ids):
            yield f"line {line} (input {ch + 1} of {take.stream})", line, take.measures(ch)


def check_signal(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    limits = f"FAIL below {SILENCE_DBFS} dBFS RMS (digital silence)"
    for item in _lines(ctx, "line-signal"):
        if isinstance(item, CheckResult):
            out.append(item)
            continue
        where, line, m = item
        if m.rms_dbfs < SILENCE_DBFS:
            out.append(CheckResult("line-signal", line, Verdict.FAIL, m.rms_dbfs, "dBFS", limits,
                                   f"no signal on {where}: check the line tap's "
                                   "wiring to this input and that the input is not muted (alsamixer)",
                                   f"peak {m.peak}"))
        else:
            out.append(CheckResult("line-signal", line, Verdict.PASS, m.rms_dbfs, "dBFS", limits, ""))
    return out


def check_noise(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    for item in _lines(ctx, "line-noise"):
        if isinstance(item, CheckResult):
            out.append(item)
            continue
        where, line, m = item
        threshold = ctx.cfg.recorder.for_line(line).threshold_db
        fail = QUIET_TALKER_DBM0 - threshold
        limits = (f"PASS <= {NOISE_PASS_DBM0:.0f} dBm0 ({dbfs(NOISE_PASS_DBM0):.1f} dBFS), "
                  f"FAIL > {fail:.0f} dBm0 ({dbfs(fail):.1f} dBFS)")
        level = dbm0(m.noise_floor_dbfs)
        verdict = Verdict.FAIL if level > fail else Verdict.WARN if level > NOISE_PASS_DBM0 else Verdict.PASS
        hint = "" if verdict is Verdict.PASS else (
            f"noisy {where} (measure with the line idle): check the tap's screen "
            "and ground, keep the cable away from power wiring" +
            ("; quiet calls will be missed" if verdict is Verdict.FAIL else ""))
        out.append(CheckResult("line-noise", line, verdict, m.noise_floor_dbfs, "dBFS", limits, hint,
                               f"{level:.1f} dBm0"))
    return out


def check_hum(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    limits = (f"PASS <= {HUM_WARN_DBM0:.0f} dBm0 ({dbfs(HUM_WARN_DBM0):.1f} dBFS), "
              f"FAIL > {HUM_FAIL_DBM0:.0f} dBm0 ({dbfs(HUM_FAIL_DBM0):.1f} dBFS) at 50 or 60 Hz")
    for item in _lines(ctx, "line-hum"):
        if isinstance(item, CheckResult):
            out.append(item)
            continue
        where, line, m = item
        level = dbm0(m.hum_dbfs)
        verdict = grade(level, warn=HUM_WARN_DBM0, fail=HUM_FAIL_DBM0)
        hint = "" if verdict is Verdict.PASS else (
            f"{m.hum_hz:.0f} Hz mains hum on {where}: a ground loop; use an "
            "isolating line tap or power the box from the same outlet as the phone system")
        out.append(CheckResult("line-hum", line, verdict, m.hum_dbfs, "dBFS", limits, hint,
                               f"{m.hum_hz:.0f} Hz, {level:.1f} dBm0"))
    return out


def check_dc(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    limits = f"PASS < {DC_WARN:.0%} of full scale, FAIL >= {DC_FAIL:.0%}"
    for item in _lines(ctx, "line-dc"):
        if isinstance(item, CheckResult):
            out.append(item)
            continue
        where, line, m = item
        pct = abs(m.dc_fraction)
        verdict = grade(pct, warn=DC_WARN, fail=DC_FAIL)
        hint = "" if verdict is Verdict.PASS else (
            f"DC offset on {where}: the input is not AC-coupled or leaks the "
            "line's loop voltage; use a transformer-isolated tap or replace the input")
        out.append(CheckResult("line-dc", line, verdict, round(m.dc_fraction * 100, 2), "%",
                               limits, hint))
    return out


def check_clipping(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    limits = f"PASS none at full scale, FAIL > {CLIP_FAIL_FRACTION * 100:.2f} % of samples"
    for item in _lines(ctx, "line-clipping"):
        if isinstance(item, CheckResult):
            out.append(item)
            continue
        where, line, m = item
        share = m.clipped / m.samples if m.samples else 0.0
        verdict = (Verdict.PASS if not m.clipped else
                   Verdict.FAIL if share > CLIP_FAIL_FRACTION else Verdict.WARN)
        hint = "" if verdict is Verdict.PASS else (
            f"{where} clips: lower the input gain (alsamixer) or add an "
            "attenuator to the line tap")
        out.append(CheckResult("line-clipping", line, verdict, round(share * 100, 3), "%", limits,
                               hint, f"{m.clipped} of {m.samples} samples at full scale"))
    return out


def check_call_level(ctx: Context) -> list[CheckResult]:
    out: list[CheckResult] = []
    limits = (f"PASS {CALL_LOW_DBM0:.0f}..{CALL_HIGH_DBM0:.0f} dBm0 "
              f"({dbfs(CALL_LOW_DBM0):.1f}..{dbfs(CALL_HIGH_DBM0):.1f} dBFS) active speech level")
    for item in _lines(ctx, "line-call-level"):
        if isinstance(item, CheckResult):
            out.append(item)
            continue
        where, line, m = item
        if m.active_fraction < ACTIVE_FRACTION:
            out.append(CheckResult("line-call-level", line, Verdict.SKIP, None, "dBFS", limits,
                                   f"no call on {where} during the test: place a "
                                   f"test call on it and run 'appliance selftest --only line-call-level'",
                                   f"speech in {m.active_fraction:.0%} of the take"))
            continue
        level = dbm0(m.active_dbfs)
        ok = CALL_LOW_DBM0 <= level <= CALL_HIGH_DBM0
        hint = "" if ok else (
            f"call level on {where} is {'too low: raise' if level < CALL_LOW_DBM0 else 'too high: lower'}"
            " the input gain (alsamixer) or change the tap's attenuation")
        out.append(CheckResult("line-call-level", line, Verdict.PASS if ok else Verdict.WARN,
                               m.active_dbfs, "dBFS", limits, hint, f"{level:.1f} dBm0"))
    return out


# -- loopback through the test plug -----------------------------------------------------------

def loopback_lines(ctx: Context) -> list[str]:
    """Lines the session asks the technician to plug, in order."""
    if ctx.cfg.selftest.loopback_lines:
        return list(ctx.cfg.selftest.loopback_lines)
    out: list[str] = []
    for s in _streams(ctx):
        if s.channels:
            out += s.line_ids(s.channels, single_stream=len(ctx.cfg.capture) == 1)
        else:
            out += [m.line for m in s.lines]
    return out


def check_loopback(ctx: Context) -> list[CheckResult]:
    limits = (f"{TONE_HZ:.0f} Hz at {TONE_DBM0:.0f} dBm0 returns on the plugged line within "
              f"{FREQ_PASS:.1%} (FAIL beyond {FREQ_FAIL:.0%}), {TONE_SNR_DB:.0f} dB above the rest")
    device = ctx.cfg.selftest.playback_device
    if not device:
        return [CheckResult("loopback", "", Verdict.SKIP, None, "", limits,
                            "no playback device configured: set selftest.playback_device to run the "
                            "loopback test with the test plug")]
    line = ctx.loopback_line
    if line is None or not ctx.manual:
        return [CheckResult("loopback", "", Verdict.SKIP, None, "", limits,
                            "needs a technician with the test plug: run 'appliance selftest' on site")]
    section = next((s for s in _streams(ctx) if line in _stream_lines(ctx, s)), None)
    if section is None:
        return [CheckResult("loopback", line, Verdict.FAIL, None, "", limits,
                            f"line {line} is not captured by any stream: check selftest.loopback_lines "
                            "and capture.lines")]
    try:
        take = _play_and_capture(ctx, section, device)
    except ApplianceError as err:
        return [CheckResult("loopback", line, Verdict.FAIL, None, "", limits,
                            f"cannot play the test tone on {device!r}: check selftest.playback_device "
                            "(see 'aplay -L')", str(err))]
    if take.pcm is None:
        return [CheckResult("loopback", line, Verdict.FAIL, None, "", limits,
                            f"no audio from stream {section.name}: fix capture-device first", take.error)]
    return [_grade_loopback(take, line, limits)]


def _stream_lines(ctx: Context, s: CaptureSection) -> list[str]:
    single = len(ctx.cfg.capture) == 1
    return s.line_ids(s.channels or 64, single_stream=single)


def _grade_loopback(take: Take, line: str, limits: str) -> CheckResult:
    if take.pcm is None or line not in take.line_ids:
        return CheckResult("loopback", line, Verdict.FAIL, None, "", limits,
                           f"line {line} is not among the captured lines {', '.join(take.line_ids)}")
    skip = min(take.pcm.shape[0] // 4, take.rate // 4)  # the resampler's start, the plug's click
    x = take.pcm[skip:].astype(np.float64) / 32768.0
    found = [dominant_tone(x[:, ch], take.rate) for ch in range(x.shape[1])]
    ch = take.line_ids.index(line)
    freq, level, rest = found[ch]
    near = [i for i, (f, lv, r) in enumerate(found)
            if abs(f - TONE_HZ) / TONE_HZ <= FREQ_FAIL and lv - r >= TONE_SNR_DB]
    detail = f"{freq:.1f} Hz at {level:.1f} dBFS, rest {rest:.1f} dBFS; from {take.description}"
    if ch not in near:
        others = [take.line_ids[i] for i in near]
        hint = (f"the test tone arrived on line {', '.join(others)}, not on {line}: the wiring or "
                "capture.lines swaps these lines" if others else
                f"no test tone on line {line}: check that the test plug is in line {line}'s socket "
                "and the playback cable is connected")
        return CheckResult("loopback", line, Verdict.FAIL, round(freq, 1), "Hz", limits, hint, detail)
    err = abs(freq - TONE_HZ) / TONE_HZ
    verdict = grade(err, warn=FREQ_PASS, fail=FREQ_FAIL)
    hint = "" if verdict is Verdict.PASS else (
        "the tone returns off-frequency: playback and capture run at different rates; set "
        "capture.rate to the interface's native rate")
    cross = [take.line_ids[i] for i in near if i != ch]
    if cross and verdict is Verdict.PASS:
        verdict = Verdict.WARN
        hint = f"the test tone also reaches line {', '.join(cross)}: crosstalk in the wiring or the tap"
    elif level < TONE_LOW_DBFS and verdict is Verdict.PASS:
        verdict = Verdict.WARN
        hint = (f"the test tone returns weak on line {line} ({level:.0f} dBFS): raise the input "
                "gain (alsamixer) or check the test plug's cable")
    return CheckResult("loopback", line, verdict, round(freq, 1), "Hz", limits, hint, detail)


def _play_and_capture(ctx: Context, section: CaptureSection, device: str) -> Take:
    """Play the test tone on ``device`` while taking audio from ``section``."""
    seconds = ctx.capture_s + 1.0
    pcm = _open_playback(device)
    rate = int(pcm.info()["rate"])
    channels = int(pcm.info()["channels"])
    stop = threading.Event()
    n = np.arange(round(rate * seconds))
    tone = np.sqrt(2.0) * 10 ** (dbfs(TONE_DBM0) / 20.0) * np.sin(2 * np.pi * TONE_HZ * n / rate)
    data = np.repeat(np.round(tone * 32767).astype("<i2")[:, None], channels, axis=1).tobytes()

    def play() -> None:
        period = 1024 * channels * 2
        try:
            for i in range(0, len(data), period):
                if stop.is_set():
                    break
                pcm.write(data[i : i + period])
        except alsa.ALSAAudioError as err:
            log.warning("playback of the test tone failed: %s", err)

    player = threading.Thread(target=play, name="selftest-tone", daemon=True)
    player.start()
    single = len(ctx.cfg.capture) == 1
    try:
        time.sleep(0.2)  # let the tone reach the plug before the take starts
        if capture_status(ctx.cfg, section) is not None:
            # Recording goes on: the tone is taken from the journal once it has been captured.
            time.sleep(ctx.capture_s)
            return journal_take(ctx.cfg, section, ctx.capture_s, single_stream=single)
        return capture_take(section, ctx.capture_s, single_stream=single)
    finally:
        stop.set()
        player.join(timeout=seconds + 2.0)
        with contextlib.suppress(alsa.ALSAAudioError):
            pcm.close()


def _open_playback(device: str) -> Any:
    import alsaaudio

    last = ""
    for rate in (48000, 44100, 16000, 8000):
        for channels in (1, 2):
            try:
                pcm = alsaaudio.PCM(type=alsaaudio.PCM_PLAYBACK, device=device, rate=rate,
                                    channels=channels, format=alsaaudio.PCM_FORMAT_S16_LE,
                                    periodsize=1024)
            except alsaaudio.ALSAAudioError as err:
                last = str(err)
                continue
            info = pcm.info()
            if int(info["rate"]) == rate and int(info["channels"]) == channels:
                return pcm
            pcm.close()
    raise AudioError(f"playback device {device!r} cannot play S16_LE mono or stereo at 8-48 kHz"
                     + (f" ({last})" if last else ""))
