"""The box's configuration: one TOML file, every key validated, every key with a safe default.

With no file at all the box records every channel of the first capture device. Errors name
the key, the value, the line in the file and what is accepted, in one line.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.errors import ConfigError

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
    period_ms: Annotated[int, Field(ge=5, le=200)] = 20
    buffer_ms: Annotated[int, Field(ge=20, le=2000)] = 200
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


class RecorderSection(_Section):
    threshold_db: Annotated[float, Field(ge=3.0, le=60.0)] = 12.0
    min_level_dbfs: Annotated[float, Field(ge=-90.0, le=0.0)] = -50.0
    start_debounce_ms: Annotated[int, Field(ge=0, le=2000)] = 60
    stop_delay_s: Annotated[float, Field(ge=0.5, le=60.0)] = 4.0
    pre_roll_s: Annotated[float, Field(ge=0.0, le=10.0)] = 2.0
    min_call_s: Annotated[float, Field(ge=0.0, le=60.0)] = 1.0
    max_segment_s: Annotated[float, Field(ge=5.0, le=3600.0)] = 300.0
    commit_interval_s: Annotated[float, Field(ge=0.1, le=10.0, description="state checkpoint")] = 1.0


class SealSection(_Section):
    codec: Literal["flac", "opus", "zstd-pcm"] = "flac"
    opus_bitrate: Annotated[int, Field(ge=6000, le=128000)] = 16000
    recipients: list[Annotated[str, Field(pattern=r"^age1[0-9a-z]{58}$")]] = Field(
        default_factory=list, description="age X25519 recipients; empty = keys/recipients.txt"
    )


class UplinkSection(_Section):
    transport: Literal["mqtt", "none"] = "mqtt"
    host: Annotated[str, Field(min_length=1, max_length=253)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    ca: Path | None = Field(None, description="CA certificate; default keys/ca.pem")
    cert: Path | None = Field(None, description="client certificate; default keys/client.pem")
    key: Path | None = Field(None, description="client key; default keys/client.key")
    window: Annotated[int, Field(ge=1, le=256)] = 8
    ack_timeout_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 15.0


class Config(_Section):
    device: DeviceSection = Field(default_factory=DeviceSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    capture: list[CaptureSection] = Field(default_factory=lambda: [CaptureSection()], min_length=1)
    ring: RingSection = Field(default_factory=RingSection)
    recorder: RecorderSection = Field(default_factory=RecorderSection)
    seal: SealSection = Field(default_factory=SealSection)
    uplink: UplinkSection = Field(default_factory=UplinkSection)

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


def load_config(path: Path | None) -> Config:
    """Load ``path``; with ``None`` use the box's default file if present, else the defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    return parse_config(text, str(path))
