"""Fleet messages between central and the boxes: signed commands, results, telemetry, config.

Written down in ``docs/protocol.md`` ("Fleet management"); this module is the one place that
encodes and decodes them, and :class:`CommandVerifier` is the one place where a box decides
whether a command really comes from central. Every message carries ``"v": 1``; anything that
does not parse raises :class:`~appliance.errors.FormatError` with a one-line reason.

A command is a canonical-JSON envelope signed by central's Ed25519 command key::

    {"v": 1, "name": "ping", "device": "box-7", "args": {}, "nonce": "<32 hex>",
     "issued_ms": 1715000000000, "expires_ms": 1715000060000,
     "key_id": "ed25519:<16 hex>", "sig": "<base64 signature over the other fields>"}

It is bound to one device, valid until ``expires_ms`` (at most :data:`MAX_COMMAND_TTL_S` after
``issued_ms``) and carries a nonce the box remembers durably until the command has expired,
so a captured command cannot be replayed, redirected or kept for later.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from linerec_contract.canonical import canonical_json
from linerec_contract.durable import atomic_write_json
from linerec_contract.errors import ApplianceError, FormatError
from linerec_contract.identity import DeviceKey, key_id_for_public, verify_signature
from linerec_contract.protocol import DEVICE_ID_RE, MAX_CONTROL_MESSAGE, PROTOCOL_VERSION, TOPIC_ROOT

MAX_COMMAND_TTL_S = 3600
CLOCK_SKEW_S = 300  # a command "issued" further in the future than this is refused
MAX_NONCES = 20_000
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")

COMMANDS: tuple[str, ...] = (
    "ping", "selftest", "restart", "reboot", "set-config", "rotate-keys", "pci-pause",
    "pci-resume", "upload-logs",
)

# Why a box refuses a command (the ``code`` of a refused CommandResult).
RefusalCode = Literal["malformed", "unsigned", "unknown-key", "bad-signature", "misaddressed",
                      "expired", "not-yet-valid", "replayed", "unknown-command", "busy"]


def cmd_req_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/cmd/req"


def cmd_res_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/cmd/res"


def config_desired_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/config/desired"


def config_reported_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/config/reported"


def heartbeat_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/heartbeat"


FLEET_SUBSCRIPTIONS: tuple[str, ...] = (
    f"{TOPIC_ROOT}/+/status", f"{TOPIC_ROOT}/+/telemetry", f"{TOPIC_ROOT}/+/event",
    f"{TOPIC_ROOT}/+/cmd/res", f"{TOPIC_ROOT}/+/config/reported", f"{TOPIC_ROOT}/+/heartbeat",
)
# Liveness (docs/protocol.md): a box whose status declares a keep-alive K sends a message at
# least every K * HEARTBEAT_FRACTION; central shows it offline once nothing arrived from it for
# K * SILENCE_FRACTION (two missed heartbeats), well within the keep-alive, while the broker
# itself gives up on a silent connection only after 1.5 K.
HEARTBEAT_FRACTION = 0.25
SILENCE_FRACTION = 0.5


def parse_fleet_topic(topic: str) -> tuple[str, str]:
    """``(device, kind)`` of a box-to-central fleet topic; kind is status, telemetry, event,
    cmd/res, config/reported or heartbeat."""
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise FormatError(f"topic {topic!r} is not under {TOPIC_ROOT}/<dev>/")
    dev, kind = parts[2], "/".join(parts[3:])
    if not DEVICE_ID_RE.match(dev):
        raise FormatError(f"device id {dev!r} in topic {topic!r} is invalid")
    if kind not in ("status", "telemetry", "event", "cmd/res", "config/reported", "heartbeat"):
        raise FormatError(f"topic {topic!r} is not a fleet topic")
    return dev, kind


def load_message(payload: bytes, what: str) -> dict[str, Any]:
    """A bounded, versioned JSON object (FormatError otherwise)."""
    if len(payload) > MAX_CONTROL_MESSAGE:
        raise FormatError(f"{what} of {len(payload)} bytes is larger than {MAX_CONTROL_MESSAGE}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"{what} is not UTF-8 JSON: {err}") from err
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object, got {type(obj).__name__}")
    if obj.get("v") != PROTOCOL_VERSION:
        raise FormatError(f"{what} has version {obj.get('v')!r}; expected v={PROTOCOL_VERSION}")
    return obj


def _int(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"{what} field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _str(obj: dict[str, Any], key: str, what: str, *, max_len: int = 4096) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise FormatError(f"{what} field {key!r} must be a string of at most {max_len} "
                          f"characters")
    return value


def _args(value: object, what: str) -> dict[str, str | int | bool]:
    if not isinstance(value, dict) or len(value) > 32:
        raise FormatError(f"{what} field 'args' must be an object with at most 32 entries")
    out: dict[str, str | int | bool] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", key):
            raise FormatError(f"{what} argument name {key!r} is invalid (lowercase word)")
        if not isinstance(item, str | int | bool) or (isinstance(item, str) and len(item) > 16384):
            raise FormatError(f"{what} argument {key!r} must be a string, integer or boolean")
        out[key] = item
    return out


@dataclass(frozen=True)
class Command:
    """A command from central to one box; ``sig`` signs every other field."""

    name: str
    device: str
    args: dict[str, str | int | bool]
    nonce: str
    issued_ms: int
    expires_ms: int
    key_id: str
    sig: str = ""
    v: int = PROTOCOL_VERSION

    def signed_bytes(self) -> bytes:
        body = asdict(self)
        del body["sig"]
        return canonical_json(body)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Command:
        what = "command"
        obj = load_message(payload, what)
        name = _str(obj, "name", what, max_len=32)
        device = _str(obj, "device", what, max_len=63)
        nonce = _str(obj, "nonce", what, max_len=32)
        if not NONCE_RE.match(nonce):
            raise FormatError("command field 'nonce' must be 32 lowercase hex digits")
        sig = obj.get("sig", "")
        if not isinstance(sig, str) or len(sig) > 128:
            raise FormatError("command field 'sig' must be a base64 string")
        return cls(name=name, device=device, args=_args(obj.get("args", {}), what), nonce=nonce,
                   issued_ms=_int(obj, "issued_ms", what), expires_ms=_int(obj, "expires_ms", what),
                   key_id=_str(obj, "key_id", what, max_len=64), sig=sig)


def sign_command(key: DeviceKey, *, name: str, device: str,
                 args: dict[str, str | int | bool] | None = None, ttl_s: float = 60.0,
                 now: float | None = None) -> Command:
    """A signed command (central side). ``ttl_s`` is bounded by :data:`MAX_COMMAND_TTL_S`."""
    if name not in COMMANDS:
        raise FormatError(f"unknown command {name!r} (accepted: {', '.join(COMMANDS)})")
    if not 1 <= ttl_s <= MAX_COMMAND_TTL_S:
        raise FormatError(f"command lifetime {ttl_s} s is out of range (1..{MAX_COMMAND_TTL_S})")
    issued = int((time.time() if now is None else now) * 1000)
    unsigned = Command(name=name, device=device, args=dict(args or {}),
                       nonce=secrets.token_hex(16), issued_ms=issued,
                       expires_ms=issued + int(ttl_s * 1000), key_id=key.key_id)
    sig = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
    return Command(**{**asdict(unsigned), "sig": sig})


@dataclass(frozen=True)
class CommandResult:
    """A box's answer on ``cmd/res``: done, failed (ran but did not succeed) or refused."""

    device: str
    name: str
    nonce: str
    result: Literal["ok", "failed", "refused"]
    code: str = ""  # refusal or failure code
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, default=str).encode()

    @classmethod
    def decode(cls, payload: bytes) -> CommandResult:
        what = "command result"
        obj = load_message(payload, what)
        result = obj.get("result")
        if result not in ("ok", "failed", "refused"):
            raise FormatError(f"{what} field 'result' must be ok, failed or refused")
        data = obj.get("data", {})
        if not isinstance(data, dict):
            raise FormatError(f"{what} field 'data' must be an object")
        ts = obj.get("ts", 0.0)
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            raise FormatError(f"{what} field 'ts' must be a number")
        return cls(device=_str(obj, "device", what, max_len=63), name=_str(obj, "name", what, max_len=32),
                   nonce=_str(obj, "nonce", what, max_len=32), result=result,
                   code=_str(obj, "code", what, max_len=64), reason=_str(obj, "reason", what),
                   data=data, ts=float(ts))


class CommandRefused(ApplianceError):
    """The box will not run this command; ``code`` says why (see :data:`RefusalCode`)."""

    def __init__(self, code: RefusalCode, reason: str, command: Command | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.command = command


class NonceStore:
    """Nonces of accepted commands, kept durably until their command has expired."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        try:
            obj = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise FormatError(f"{self.path}: the command nonce store does not read as JSON "
                              f"({err}); move it aside to start a new one") from err
        if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in obj.items()):
            raise FormatError(f"{self.path}: expected {{nonce: expires_ms}}")
        return obj

    def seen(self, nonce: str) -> bool:
        return nonce in self._seen

    def remember(self, nonce: str, expires_ms: int, now_ms: int) -> None:
        """Record ``nonce`` (durably) before its command runs."""
        kept = {n: e for n, e in self._seen.items() if e >= now_ms}
        if len(kept) >= MAX_NONCES:
            raise CommandRefused("busy", f"{len(kept)} unexpired commands are remembered; "
                                 f"try again once some expire")
        kept[nonce] = expires_ms
        # Durability: a nonce is on disk before its command runs, so a command cannot run twice
        # even if the box loses power right after running it.
        atomic_write_json(self.path, kept)
        self._seen = kept


class CommandVerifier:
    """The one place a box decides whether a command comes from central and is meant for it."""

    def __init__(self, device_id: str, central_key_b64: str, nonces: NonceStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.central_key_b64 = central_key_b64
        self.central_key_id = key_id_for_public(central_key_b64)
        self.nonces = nonces
        self.clock = clock

    def verify(self, payload: bytes) -> Command:
        """The command, or CommandRefused naming why it must not run."""
        try:
            cmd = Command.decode(payload)
        except FormatError as err:
            raise CommandRefused("malformed", str(err)) from err
        if not cmd.sig:
            raise CommandRefused("unsigned", "the command carries no signature", cmd)
        if cmd.key_id != self.central_key_id:
            raise CommandRefused("unknown-key", f"signed with key {cmd.key_id}; this box "
                                 f"accepts only central's command key {self.central_key_id}", cmd)
        try:
            signature = base64.b64decode(cmd.sig.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            signature = b""
        if not verify_signature(self.central_key_b64, signature, cmd.signed_bytes()):
            raise CommandRefused("bad-signature", "the signature does not verify with central's "
                                 "command key", cmd)
        if cmd.device != self.device_id:
            raise CommandRefused("misaddressed", f"the command is for {cmd.device}, this box is "
                                 f"{self.device_id}", cmd)
        now_ms = int(self.clock() * 1000)
        if cmd.expires_ms - cmd.issued_ms > MAX_COMMAND_TTL_S * 1000 or \
                cmd.expires_ms < cmd.issued_ms:
            raise CommandRefused("malformed", f"lifetime must be 0..{MAX_COMMAND_TTL_S} s", cmd)
        if now_ms > cmd.expires_ms:
            raise CommandRefused("expired", f"the command expired {(now_ms - cmd.expires_ms) / 1000:.0f}"
                                 f" s ago", cmd)
        if cmd.issued_ms > now_ms + CLOCK_SKEW_S * 1000:
            raise CommandRefused("not-yet-valid", "the command is issued more than "
                                 f"{CLOCK_SKEW_S} s in the future (check the clocks)", cmd)
        if self.nonces.seen(cmd.nonce):
            raise CommandRefused("replayed", f"nonce {cmd.nonce} was already used", cmd)
        if cmd.name not in COMMANDS:
            raise CommandRefused("unknown-command", f"unknown command {cmd.name!r} (this box "
                                 f"knows: {', '.join(COMMANDS)})", cmd)
        self.nonces.remember(cmd.nonce, cmd.expires_ms, now_ms)
        return cmd


# -- desired and reported configuration --------------------------------------------------------

@dataclass(frozen=True)
class DesiredConfig:
    """``config/desired`` (retained, from central): config keys central sets on this box, as a
    nested object laid over the box's own config file, and their version."""

    version: int
    overrides: dict[str, Any]
    ts: float = 0.0
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> DesiredConfig:
        obj = load_message(payload, "desired config")
        overrides = obj.get("overrides")
        if not isinstance(overrides, dict):
            raise FormatError("desired config field 'overrides' must be an object")
        ts = obj.get("ts", 0.0)
        return cls(version=_int(obj, "version", "desired config"), overrides=overrides,
                   ts=float(ts) if isinstance(ts, int | float) else 0.0)


@dataclass(frozen=True)
class ReportedConfig:
    """``config/reported`` (retained, from the box): what it runs and what became of a push."""

    version: int  # the version running now
    result: Literal["applied", "refused", "rolled-back", "unchanged"]
    desired_version: int
    reason: str = ""
    ts: float = 0.0
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> ReportedConfig:
        what = "reported config"
        obj = load_message(payload, what)
        result = obj.get("result")
        if result not in ("applied", "refused", "rolled-back", "unchanged"):
            raise FormatError(f"{what} field 'result' is invalid: {result!r}")
        ts = obj.get("ts", 0.0)
        return cls(version=_int(obj, "version", what), result=result,
                   desired_version=_int(obj, "desired_version", what),
                   reason=_str(obj, "reason", what), ts=float(ts) if isinstance(ts, int | float) else 0.0)
