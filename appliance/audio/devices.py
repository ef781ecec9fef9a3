"""``appliance devices`` and ``appliance sample``: what can be captured, and a short test take.

Devices are listed by stable names: ALSA ``hw:CARD=<id>,DEV=<n>`` (and the PCMs the ALSA
configuration defines), PortAudio device names; never by index. Channels, rates and formats
come from each device's hardware-parameter space, probed without blocking.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import alsaaudio
import numpy as np
import soundfile
from pydantic import ValidationError

from appliance.audio import alsa
from appliance.audio.source import AudioError, Block, DeviceLost, SourceExhausted
from appliance.config import CaptureSection
from linerec_contract.errors import ApplianceError, UsageError

log = logging.getLogger(__name__)

# Per-card PCMs that only repackage the hw device listed next to them.
_ALIASES = ("plughw:", "sysdefault:", "front:", "rear:", "center_lfe:", "side:", "surround",
            "iec958:", "hdmi:", "dmix:", "dsnoop:", "usbstream:")


@dataclass(frozen=True)
class DeviceRow:
    api: str
    device: str
    description: str
    channels: str
    rates: str
    formats: tuple[str, ...]
    capture_formats: tuple[str, ...]
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "api": self.api, "device": self.device, "description": self.description,
            "channels": self.channels, "rates": self.rates, "formats": list(self.formats),
            "capture_formats": list(self.capture_formats), "error": self.error or None,
        }


def _card_names() -> dict[str, str]:
    names: dict[str, str] = {}
    try:
        for index, card_id in zip(alsaaudio.card_indexes(), alsaaudio.cards(),
                                  strict=False):
            try:
                long_name = alsaaudio.card_name(index)
                names[card_id] = str(long_name[1] if isinstance(long_name, tuple) else long_name)
            except alsa.ALSAAudioError:
                names[card_id] = card_id
    except alsa.ALSAAudioError as err:
        log.debug("listing ALSA cards: %s", err)
    return names


def alsa_names() -> list[str]:
    """Capture PCM names worth listing: every hw device and every PCM not tied to a card."""
    try:
        hinted = [str(n) for n in alsaaudio.pcms(alsaaudio.PCM_CAPTURE)]
    except alsa.ALSAAudioError as err:
        log.debug("listing ALSA PCMs: %s", err)
        hinted = []
    names = [n for n in hinted if n.startswith("hw:")]
    names += [n for n in hinted if "CARD=" not in n and not n.startswith(_ALIASES)]
    for card in alsaaudio.cards():
        first = f"hw:CARD={card},DEV=0"
        if not any(n.startswith(f"hw:CARD={card},") for n in names):
            names.insert(0, first)
    return list(dict.fromkeys(names))


def alsa_rows() -> list[DeviceRow]:
    cards = _card_names()
    rows: list[DeviceRow] = []
    for name in alsa_names():
        card = name.split("CARD=", 1)[1].split(",", 1)[0] if "CARD=" in name else ""
        desc = cards.get(card, "") if card else "ALSA configuration"
        try:
            caps = alsa.probe(name)
        except ApplianceError as err:
            rows.append(DeviceRow("alsa", name, desc, "", "", (), (), error=str(err)))
            continue
        rows.append(DeviceRow("alsa", name, desc, caps.describe_channels(),
                              caps.describe_rates(), caps.formats, caps.supported_formats))
    return rows


def portaudio_rows() -> list[DeviceRow]:
    try:
        import sounddevice as sd
    except OSError as err:  # no PortAudio library: ALSA is enough
        log.debug("PortAudio not available: %s", err)
        return []
    try:
        devices = [dict(d) for d in sd.query_devices()]
        apis = [dict(a) for a in sd.query_hostapis()]
    except sd.PortAudioError as err:
        return [DeviceRow("portaudio", "", "", "", "", (), (), error=str(err))]
    rows: list[DeviceRow] = []
    for d in devices:
        max_in = int(d["max_input_channels"])
        if max_in <= 0:
            continue
        api = str(apis[int(d["hostapi"])]["name"]) if int(d["hostapi"]) < len(apis) else ""
        fmts = ("S16_LE", "S24_3LE", "S32_LE", "FLOAT_LE")
        rows.append(DeviceRow("portaudio", str(d["name"]), f"{api} (converts formats)",
                              f"1-{max_in}", f"default {float(d['default_samplerate']):.0f} Hz",
                              fmts, fmts))
    return rows


def list_devices() -> list[DeviceRow]:
    return alsa_rows() + portaudio_rows()


NO_CARD = ("no sound card found: only PCMs from the ALSA configuration are listed (such as "
           "'null', which captures nothing real); check that the audio interface is plugged in and "
           "powered ('lsusb'), that its driver loaded ('dmesg | tail', 'cat /proc/asound/cards'), "
           "and that this user may open /dev/snd (group 'audio')")


def sound_cards() -> list[str]:
    """ALSA card ids present (kernel drivers), not counting PCMs defined in the configuration."""
    try:
        return [str(c) for c in alsaaudio.cards()]
    except alsa.ALSAAudioError:
        return []


def devices_command(as_json: bool) -> int:
    """Print the capture devices; exit 0 when there is at least one, 1 when there is none.

    Without a sound card it says so (on stderr with ``--json``, so the JSON stays a list)."""
    rows = list_devices()
    if not sound_cards():
        print(NO_CARD, file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, sort_keys=True))
    elif not rows:
        print("no capture devices found (no ALSA card, no PortAudio input)")
    else:
        print(f"{'API':<10}{'DEVICE':<30}{'CHANNELS':<10}{'RATES':<24}FORMATS")
        for r in rows:
            if r.error:
                print(f"{r.api:<10}{r.device:<30}unusable: {r.error}")
                continue
            fmts = ", ".join(r.capture_formats) or f"none usable ({', '.join(r.formats)})"
            print(f"{r.api:<10}{r.device:<30}{r.channels:<10}{r.rates:<24}{fmts}")
            if r.description:
                print(f"{'':<10}  {r.description}")
    return 0 if any(not r.error for r in rows) else 1


SAMPLE_FLAGS = {"channels": "--channels", "rate": "--rate", "sample_format": "--format",
                "storage_rate": "--storage-rate", "device": "--device"}


def _flag_message(message: str) -> str:
    """A capture error in the words of ``appliance sample``'s flags, not config keys."""
    for key, flag in SAMPLE_FLAGS.items():
        message = message.replace(f"capture.{key} =", flag).replace(f"capture.{key}", flag)
    return message


def sample_command(
    device: str, channels: int | None, rate: int | None, seconds: float, out: Path,
    *, sample_format: str = "auto", storage_rate: int = 8000,
) -> int:
    """Record ``seconds`` from an ALSA ``device`` through the capture path to a WAV file.

    The WAV holds what the journal would hold: int16 at the storage rate (``storage_rate``),
    one channel per line; ``rate`` is the rate the device is opened at.
    """
    try:
        section = CaptureSection.model_validate({
            "source": "alsa", "device": device, "channels": channels or 0, "rate": rate or 0,
            "sample_format": sample_format, "storage_rate": storage_rate,
        })
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        raise UsageError(f"sample: {SAMPLE_FLAGS.get(key, key)} {first.get('input')!r}: "
                         f"{first['msg']}") from err
    if not 0 < seconds <= 3600:
        raise UsageError(f"sample: --seconds {seconds}: expected more than 0 and at most 3600")
    src = alsa.AlsaSource.from_section(section)
    want = max(1, round(seconds * storage_rate))
    blocks: list[Block] = []
    got = 0
    try:
        src.open(0)
    except ApplianceError as err:
        err.args = (_flag_message(str(err)),)
        raise
    try:
        while got < want:
            try:
                blk = src.read()
            except SourceExhausted:
                break
            except DeviceLost as err:
                raise AudioError(f"sample: {err}") from err
            blocks.append(blk)
            got += blk.frames
    finally:
        src.close()
    if not blocks:
        raise AudioError(f"sample: {src.description} delivered no audio")
    pcm = np.concatenate([b.pcm for b in blocks])[:want]
    lost = sum(b.lost_frames for b in blocks)
    try:
        soundfile.write(str(out), pcm, storage_rate, subtype="PCM_16", format="WAV")
    except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
        raise UsageError(f"sample: --out {out}: cannot write the WAV file ({err})") from err
    peaks = np.abs(pcm.astype(np.int32)).max(axis=0)
    rms = np.sqrt(np.mean(pcm.astype(np.float64) ** 2, axis=0))
    levels = "  ".join(
        f"ch{i + 1} {_db(float(r)):.1f}/{_db(float(p)):.1f}"
        for i, (r, p) in enumerate(zip(rms, peaks, strict=True)))
    print(f"wrote {out}: {pcm.shape[1]} ch, {storage_rate} Hz, {pcm.shape[0] / storage_rate:.2f} s "
          f"from {src.description}")
    if src.choice is not None and src.choice.rate != storage_rate:
        print(f"the device ran at {src.choice.rate} Hz; the WAV holds what the journal stores, "
              f"resampled to {storage_rate} Hz (--storage-rate 8000 or 16000)")
    print(f"levels dBFS rms/peak: {levels}")
    if lost:
        print(f"WARNING: {lost} frames lost to overruns during the take")
    return 0


def _db(x: float) -> float:
    return -120.0 if x <= 0 else max(-120.0, 20.0 * float(np.log10(x / 32768.0)))
