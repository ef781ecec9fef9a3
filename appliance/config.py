"""The box's configuration: one TOML file, every key validated, every key with a safe default.

With no file at all the box records every channel of the first capture device. Errors name
the key, the value, the line in the file and what is accepted, in one line.
"""

from __future__ import annotations

import json
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from linerec_contract.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.toml")
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
SampleFormatName = Literal["auto", "S16_LE", "S24_3LE", "S24_LE", "S32_LE", "FLOAT_LE"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_device_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "box"
    return f"box-{host}"


class DeviceSection(_Section):
    id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN, description="device id, the MQTT user name")] = (
        Field(default_factory=_default_device_id)
    )


class PathsSection(_Section):
    state_dir: Path = Field(Path("/var/lib/appliance"), description="journals, outbox, keys, state")


class LineMap(_Section):
    channel: Annotated[int, Field(ge=1, le=64, description="device channel, 1-based")]
    line: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="line id")]
    label: Annotated[str, Field(max_length=80)] = ""


class CaptureSection(_Section):
    name: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,16}$", description="stream name")] = "main"
    source: Literal["alsa", "portaudio", "wav", "simulator"] = "alsa"
    device: Annotated[str, Field(min_length=1, description="ALSA PCM or card id; 'auto' = first")] = (
        "auto"
    )
    channels: Annotated[int, Field(ge=0, le=64, description="0 = every channel of the device")] = 0
    rate: Annotated[int, Field(ge=0, le=192000, description="device rate; 0 = device default")] = 0
    sample_format: SampleFormatName = "auto"
    # A recorder needs no low latency: 200 ms periods wake capture 5 times a second, and the
    # 1 s buffer leaves 4 periods of slack under load.
    period_ms: Annotated[int, Field(ge=5, le=200)] = 200
    buffer_ms: Annotated[int, Field(ge=20, le=2000)] = 1000
    storage_rate: Literal[8000, 16000] = 8000
    lines: list[LineMap] = Field(default_factory=list, description="channel -> line id map")
    wav_path: Path | None = Field(None, description="file for source = 'wav'")
    realtime: bool = Field(True, description="pace file and simulator sources like a real device")
    sim_lines: Annotated[int, Field(ge=1, le=64)] = 4
    sim_seed: Annotated[int, Field(ge=0, le=2**31)] = 1
    sim_mean_idle_s: Annotated[float, Field(ge=6.0, le=86400.0)] = 8.0
    sim_mean_call_s: Annotated[float, Field(ge=4.0, le=86400.0)] = 20.0
    sim_max_call_s: Annotated[float, Field(ge=4.0, le=86400.0)] = 60.0
    stop_after_s: Annotated[float, Field(ge=0.0, description="finite sources: 0 = run forever")] = 0.0
    rt_priority: Annotated[
        int, Field(ge=0, le=99, description="SCHED_FIFO priority of capture; 0 = normal")
    ] = 20

    @model_validator(mode="after")
    def _source_needs(self) -> CaptureSection:
        if self.source == "wav" and self.wav_path is None:
            raise ValueError("source = 'wav' needs wav_path")
        lines = [m.line for m in self.lines]
        if len(set(lines)) != len(lines):
            raise ValueError("line ids in 'lines' must be unique")
        return self

    def line_ids(self, channels: int, *, single_stream: bool) -> list[str]:
        """Line id for each device channel (mapped ones by the map, others by position)."""
        mapped = {m.channel: m.line for m in self.lines}
        prefix = "L" if single_stream else f"{self.name}-L"
        return [mapped.get(ch, f"{prefix}{ch}") for ch in range(1, channels + 1)]


class RingSection(_Section):
    size_mb: Annotated[int, Field(ge=1, le=65536, description="journal size per stream, MiB")] = 64
    sync_interval_ms: Annotated[int, Field(ge=10, le=5000, description="power-loss window")] = 500
    slot_size: Annotated[int, Field(ge=4096, le=1048576, multiple_of=4096)] = 8192


DigitSequence = Annotated[str, Field(pattern=r"^[0-9*#A-D]{0,8}$")]
ToneCountry = Literal["na", "uk", "etsi"]
MaskMode = Literal["silence", "comfort-noise"]


class _LineSettings(_Section):
    """Recorder settings that can also be set per line (see RecorderLine)."""

    threshold_db: Annotated[
        float, Field(ge=3.0, le=60.0, description="voice: this far above the floor")] = 12.0
    min_level_dbfs: Annotated[
        float, Field(ge=-90.0, le=0.0, description="voice: above this level")] = -50.0
    start_debounce_ms: Annotated[int, Field(ge=0, le=2000, description="voice this long starts a call")] = 60
    stop_delay_s: Annotated[float, Field(ge=0.5, le=60.0, description="silence this long ends a call")] = 4.0
    pre_roll_s: Annotated[float, Field(ge=0.0, le=10.0, description="audio kept before the start")] = 2.0
    min_call_s: Annotated[float, Field(ge=0.0, le=60.0, description="shorter calls are dropped")] = 1.0
    max_segment_s: Annotated[float, Field(ge=5.0, le=3600.0, description="longest part of a call")] = 300.0
    dtmf_min_level_dbfs: Annotated[
        float, Field(ge=-60.0, le=-10.0, description="DTMF: quietest tone")] = -45.0
    dtmf_twist_normal_db: Annotated[
        float, Field(ge=0.0, le=20.0, description="DTMF: high tone this much below the low tone")] = 8.0
    dtmf_twist_reverse_db: Annotated[
        float, Field(ge=0.0, le=20.0, description="DTMF: high tone this much above the low tone")] = 4.0
    dtmf_freq_tolerance_pct: Annotated[
        float, Field(ge=1.5, le=3.5, description="DTMF: accepted deviation, %")] = 2.5
    dtmf_min_tone_ms: Annotated[int, Field(ge=30, le=200, description="DTMF: shortest digit")] = 40
    dtmf_min_pause_ms: Annotated[int, Field(ge=20, le=200, description="DTMF: shortest pause")] = 40
    tone_country: ToneCountry = Field("etsi", description="call-progress tone preset")
    end_call_on_busy: bool = Field(True, description="a busy or reorder tone ends the call at once")
    caller_id: bool = Field(True, description="decode FSK and DTMF caller ID")
    pci_masking: bool = Field(False, description="replace DTMF in stored audio, keep no digits")
    pci_mask_mode: MaskMode = Field("silence", description="what replaces a masked digit")
    pci_margin_ms: Annotated[int, Field(ge=0, le=100, description="masked before and after a digit")] = 20
    pci_pause_sequence: DigitSequence = Field("", description="digits that open a pause window")
    pci_resume_sequence: DigitSequence = Field("", description="digits that close it")
    pci_pause_max_s: Annotated[float, Field(ge=10.0, le=7200.0, description="longest pause window")] = 600.0
    long_call_alarm_h: Annotated[float, Field(ge=0.01, le=168.0, description="alarm: in a call longer")] = 4.0
    silent_alarm_days: Annotated[float, Field(ge=0.01, le=365.0, description="alarm: no call for days")] = 7.0

    @model_validator(mode="after")
    def _sequences(self) -> _LineSettings:
        if bool(self.pci_pause_sequence) != bool(self.pci_resume_sequence):
            raise ValueError("pci_pause_sequence and pci_resume_sequence must be set together")
        if self.pci_pause_sequence and self.pci_pause_sequence == self.pci_resume_sequence:
            raise ValueError("pci_pause_sequence and pci_resume_sequence must differ")
        return self


class RecorderLine(_Section):
    """Per-line overrides: ``[[recorder.line]]`` with ``line = "L1"`` and any key of
    [recorder] that describes a line."""

    line: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="line id")]
    threshold_db: Annotated[float, Field(ge=3.0, le=60.0)] | None = None
    min_level_dbfs: Annotated[float, Field(ge=-90.0, le=0.0)] | None = None
    start_debounce_ms: Annotated[int, Field(ge=0, le=2000)] | None = None
    stop_delay_s: Annotated[float, Field(ge=0.5, le=60.0)] | None = None
    pre_roll_s: Annotated[float, Field(ge=0.0, le=10.0)] | None = None
    min_call_s: Annotated[float, Field(ge=0.0, le=60.0)] | None = None
    max_segment_s: Annotated[float, Field(ge=5.0, le=3600.0)] | None = None
    dtmf_min_level_dbfs: Annotated[float, Field(ge=-60.0, le=-10.0)] | None = None
    dtmf_twist_normal_db: Annotated[float, Field(ge=0.0, le=20.0)] | None = None
    dtmf_twist_reverse_db: Annotated[float, Field(ge=0.0, le=20.0)] | None = None
    dtmf_freq_tolerance_pct: Annotated[float, Field(ge=1.5, le=3.5)] | None = None
    dtmf_min_tone_ms: Annotated[int, Field(ge=30, le=200)] | None = None
    dtmf_min_pause_ms: Annotated[int, Field(ge=20, le=200)] | None = None
    tone_country: ToneCountry | None = None
    end_call_on_busy: bool | None = None
    caller_id: bool | None = None
    pci_masking: bool | None = None
    pci_mask_mode: MaskMode | None = None
    pci_margin_ms: Annotated[int, Field(ge=0, le=100)] | None = None
    pci_pause_sequence: DigitSequence | None = None
    pci_resume_sequence: DigitSequence | None = None
    pci_pause_max_s: Annotated[float, Field(ge=10.0, le=7200.0)] | None = None
    long_call_alarm_h: Annotated[float, Field(ge=0.01, le=168.0)] | None = None
    silent_alarm_days: Annotated[float, Field(ge=0.01, le=365.0)] | None = None


class RecorderSection(_LineSettings):
    # The checkpoint bounds how much journal a restarted recorder reads again, not what is
    # kept (the journal holds the audio): every 5 s, not every second, halves its CPU cost.
    commit_interval_s: Annotated[float, Field(ge=0.1, le=10.0, description="state checkpoint")] = 5.0
    read_interval_s: Annotated[
        float, Field(ge=0.02, le=5.0, description="journal reads when caught up")
    ] = 2.0
    line: list[RecorderLine] = Field(default_factory=list, description="per-line overrides")

    @model_validator(mode="after")
    def _unique_lines(self) -> RecorderSection:
        ids = [o.line for o in self.line]
        if len(set(ids)) != len(ids):
            raise ValueError("recorder.line entries must name each line once")
        for o in self.line:
            self.for_line(o.line)  # the merged settings must validate too
        return self

    def for_line(self, line: str) -> _LineSettings:
        """The settings of ``line``: [recorder] with its [[recorder.line]] overrides."""
        base = {k: getattr(self, k) for k in _LineSettings.model_fields}
        for o in self.line:
            if o.line == line:
                base.update({k: v for k, v in o.model_dump(exclude={"line"}).items() if v is not None})
        return _LineSettings.model_validate(base)


class SealSection(_Section):
    codec: Literal["flac", "opus", "zstd-pcm"] = "flac"
    opus_bitrate: Annotated[int, Field(ge=6000, le=128000)] = 16000
    opus_complexity: Annotated[int, Field(ge=0, le=10)] = Field(
        default=5, description="libopus complexity: lower costs less CPU at some quality"
    )
    recipients: list[Annotated[str, Field(pattern=r"^age1[0-9a-z]{58}$")]] = Field(
        default_factory=list, description="age X25519 recipients; empty = keys/recipients.txt"
    )


class UplinkSection(_Section):
    transport: Literal["mqtt", "https", "none"] = "mqtt"
    host: Annotated[str, Field(min_length=1, max_length=253)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    https_url: str | None = Field(
        None, pattern=r"^https://[^/\s]+/?$",
        description="central's HTTPS receiver, https://host[:port]; default https://host:port")
    ca: Path | None = Field(None, description="CA certificate; default keys/ca.pem")
    cert: Path | None = Field(None, description="client certificate; default keys/client.pem")
    key: Path | None = Field(None, description="client key; default keys/client.key")
    window: Annotated[int, Field(ge=1, le=256)] = 8
    ack_timeout_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 15.0
    chunk_bytes: Annotated[int, Field(
        ge=4096, le=1024 * 1024,  # linerec_contract.protocol.MAX_CHUNK_BYTES (broker's bound)
        description="segments larger than this go over MQTT in chunks of this size")] = 256 * 1024
    max_kbps: Annotated[float, Field(
        ge=0, le=10_000_000, description="upload cap in kbit/s, both transports; 0 = no cap")] = 0
    order: Literal["oldest", "newest"] = Field("oldest", description="which backlog goes first")
    outbox_max_mb: Annotated[float, Field(
        ge=0, le=10_000_000, description="outbox quota in MiB; 0 = only the disk's reserve")] = 0
    disk_full_policy: Literal["stop-new-calls", "drop-oldest"] = Field(
        "stop-new-calls", description="when the outbox is full of unsent segments")
    keepalive_s: Annotated[int, Field(
        ge=5, le=3600,
        description="MQTT keep-alive; the fleet agent sends something at least every quarter "
        "of it and central shows the box offline after half of it without a message")] = 30


class HealthSection(_Section):
    watchdog_s: Annotated[float, Field(
        ge=1.0, le=600.0,
        description="appliance run: a stage silent this long (no WATCHDOG=1) is restarted")] = 30.0
    unsent_limit_s: Annotated[float, Field(
        ge=10.0, le=30 * 86400.0,
        description="status: attention when the oldest unsent segment is older")] = 900.0
    drain_on_stop_s: Annotated[float, Field(
        ge=0.0, le=600.0,
        description="appliance run: on stop, let the uplink send the outbox for up to this")] = 10.0


class SelftestSection(_Section):
    """The technician's self-test (``appliance selftest``): see hw-tests/README.md."""

    capture_s: Annotated[float, Field(ge=1.0, le=60.0, description="audio taken per line check")] = 3.0
    playback_device: str = Field(
        "", description="ALSA PCM that feeds the test plug for the loopback test; '' = no loopback")
    loopback_lines: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]] = Field(
        default_factory=list, description="lines tested with the test plug; empty = every line")


class FleetSection(_Section):
    telemetry_interval_s: Annotated[float, Field(
        ge=1.0, le=3600.0, description="how often the box sends telemetry to central")] = 60.0


class Config(_Section):
    device: DeviceSection = Field(default_factory=DeviceSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    capture: list[CaptureSection] = Field(default_factory=lambda: [CaptureSection()], min_length=1)
    ring: RingSection = Field(default_factory=RingSection)
    recorder: RecorderSection = Field(default_factory=RecorderSection)
    seal: SealSection = Field(default_factory=SealSection)
    uplink: UplinkSection = Field(default_factory=UplinkSection)
    health: HealthSection = Field(default_factory=HealthSection)
    selftest: SelftestSection = Field(default_factory=SelftestSection)
    fleet: FleetSection = Field(default_factory=FleetSection)

    @model_validator(mode="after")
    def _unique_streams(self) -> Config:
        names = [c.name for c in self.capture]
        if len(set(names)) != len(names):
            raise ValueError("capture stream names must be unique")
        return self

    # Paths derived from state_dir: one place, so tests and the demo can relocate everything.
    @property
    def state_dir(self) -> Path:
        return self.paths.state_dir

    def ring_path(self, stream: str) -> Path:
        return self.state_dir / "ring" / f"{stream}.ring"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def run_dir(self) -> Path:
        """Advisory status files for live views."""
        return self.state_dir / "run"

    def recorder_dir(self, stream: str) -> Path:
        return self.state_dir / "recorder" / stream

    def tls_paths(self) -> tuple[Path, Path, Path]:
        u = self.uplink
        return (
            u.ca or self.keys_dir / "ca.pem",
            u.cert or self.keys_dir / "client.pem",
            u.key or self.keys_dir / "client.key",
        )


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=", re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _format_error(err: ValidationError, text: str, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    leaf = next((str(p) for p in reversed(first["loc"]) if isinstance(p, str)), "")
    line = _line_of(text, leaf) if leaf else None
    where = f"{origin}:{line}" if line else origin
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{loc}' (check the spelling; see docs/config.md)"
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    return f"{where}: key '{loc}': {msg}{shown}"


def parse_config(text: str, origin: str = "<config>") -> Config:
    """Validate TOML text; raise ConfigError with a one-line message."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from err
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, text, origin)) from err


FLEET_OVERRIDES = "fleet/config-overrides.json"


def merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over ``base``: tables merge key by key, everything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def with_fleet_overrides(cfg: Config, raw: dict[str, Any], origin: str) -> Config:
    """``cfg`` with the config keys central pushed (``<state_dir>/fleet/config-overrides.json``,
    written by the fleet agent after the same validation) laid over the file's."""
    path = cfg.state_dir / FLEET_OVERRIDES
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return cfg  # nothing pushed (or no state folder: the stage reports that one itself)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: pushed config cannot be read: {err}") from err
    overrides = doc.get("overrides") if isinstance(doc, dict) else None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: expected {{\"version\": N, \"overrides\": {{...}}}}")
    try:
        return Config.model_validate(merge_config(raw, overrides))
    except ValidationError as err:
        raise ConfigError(_format_error(err, "", f"{origin} + {path}")) from err


def load_config(path: Path | None) -> Config:
    """Load ``path``; with ``None`` use the box's default file if present, else the defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return with_fleet_overrides(Config(), {}, "defaults")
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    cfg = parse_config(text, str(path))
    return with_fleet_overrides(cfg, tomllib.loads(text), str(path))
