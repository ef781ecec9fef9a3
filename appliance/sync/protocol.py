"""MQTT topic names and the small typed messages exchanged between box and central.

The wire protocol is written down in ``docs/protocol.md``; this module is the one place that
encodes and decodes it. Every message carries a version ``v``; a message that does not parse
raises :class:`~appliance.errors.FormatError` with a one-line reason (never returns ``None``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from appliance.errors import FormatError

PROTOCOL_VERSION = 1
TOPIC_ROOT = "rec/v1"
MAX_CONTROL_MESSAGE = 64 * 1024
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

AckResult = Literal["stored", "duplicate", "rejected"]
ACK_RESULTS: tuple[str, ...] = ("stored", "duplicate", "rejected")


def status_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/status"


def telemetry_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/telemetry"


def event_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/event"


def segment_topic(dev: str, seq: int) -> str:
    return f"{TOPIC_ROOT}/{dev}/seg/{seq}"


def ack_topic(dev: str) -> str:
    return f"{TOPIC_ROOT}/{dev}/ack"


SEGMENT_SUBSCRIPTION = f"{TOPIC_ROOT}/+/seg/+"
STATUS_SUBSCRIPTION = f"{TOPIC_ROOT}/+/status"


def shared(group: str, topic_filter: str) -> str:
    """A shared subscription so several receivers split the load."""
    return f"$share/{group}/{topic_filter}"


def parse_segment_topic(topic: str) -> tuple[str, int]:
    """Return ``(device_id, seq)`` from ``rec/v1/<dev>/seg/<seq>``."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or parts[3] != "seg":
        raise FormatError(
            f"topic {topic!r} is not a segment topic (expected {TOPIC_ROOT}/<dev>/seg/<seq>)"
        )
    dev, seq_text = parts[2], parts[4]
    if not DEVICE_ID_RE.match(dev):
        raise FormatError(f"device id {dev!r} in topic is invalid (letters, digits, '_.-', max 63)")
    if not seq_text.isdigit():
        raise FormatError(
            f"segment number {seq_text!r} in topic {topic!r} is not a non-negative integer"
        )
    return dev, int(seq_text)


def _load_object(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_MESSAGE:
        raise FormatError(f"{what} of {len(payload)} bytes is larger than {MAX_CONTROL_MESSAGE}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{what} is not UTF-8 JSON: {err}") from err
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object, got {type(obj).__name__}")
    if obj.get("v") != PROTOCOL_VERSION:
        raise FormatError(
            f"{what} has version {obj.get('v')!r}; this box speaks v={PROTOCOL_VERSION}"
        )
    return obj


@dataclass(frozen=True)
class Ack:
    """Central's answer to a segment: only ``stored``/``duplicate`` let the box delete it."""

    seq: int
    sha256: str
    result: AckResult
    reason: str = ""
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        obj = _load_object(payload, "ack")
        seq, sha, result = obj.get("seq"), obj.get("sha256"), obj.get("result")
        reason = obj.get("reason", "")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise FormatError(f"ack field 'seq' must be a non-negative integer, got {seq!r}")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise FormatError("ack field 'sha256' must be 64 lowercase hex digits")
        if result not in ACK_RESULTS:
            raise FormatError(
                f"ack field 'result' must be one of {', '.join(ACK_RESULTS)}, got {result!r}"
            )
        if not isinstance(reason, str):
            raise FormatError("ack field 'reason' must be a string")
        return cls(seq=seq, sha256=sha, result=result, reason=reason)


@dataclass(frozen=True)
class Status:
    """Retained birth/last-will message of a box."""

    state: Literal["online", "offline"]
    version: str
    boot_id: str
    session: int
    ts: float
    config_version: int = 0  # the fleet config version the box runs (0: none pushed)
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        obj = _load_object(payload, "status")
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise FormatError(f"status field 'state' must be online or offline, got {state!r}")
        try:
            return cls(
                state=state,
                version=str(obj["version"]),
                boot_id=str(obj["boot_id"]),
                session=int(obj["session"]),
                ts=float(obj["ts"]),
                config_version=int(obj.get("config_version", 0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"status message is missing or has a bad field: {err}") from err


# -- chunking (MQTT v5 user properties on rec/v1/<dev>/seg/<seq>) --------------------------------

CHUNK_PROP = "chunk"  # "<index>/<count>", index 0-based
CHUNK_SHA_PROP = "seg-sha256"  # SHA-256 of the whole wire blob (all chunks joined)
CHUNK_SIZE_PROP = "seg-bytes"  # length of the whole wire blob
MAX_CHUNKS = 4096
MAX_SEGMENT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ChunkInfo:
    """Where one MQTT message sits in a chunked segment (see docs/protocol.md, "Chunking")."""

    index: int
    count: int
    blob_sha256: str
    blob_bytes: int

    def user_properties(self) -> list[tuple[str, str]]:
        return [(CHUNK_PROP, f"{self.index}/{self.count}"), (CHUNK_SHA_PROP, self.blob_sha256),
                (CHUNK_SIZE_PROP, str(self.blob_bytes))]

    @classmethod
    def from_user_properties(cls, props: list[tuple[str, str]] | None) -> ChunkInfo | None:
        """The chunk description, None for an unchunked segment, FormatError when malformed."""
        values = dict(props or [])
        if CHUNK_PROP not in values:
            return None
        index_text, _, count_text = values[CHUNK_PROP].partition("/")
        sha, size_text = values.get(CHUNK_SHA_PROP, ""), values.get(CHUNK_SIZE_PROP, "")
        if not (index_text.isdigit() and count_text.isdigit()):
            raise FormatError(f"user property {CHUNK_PROP}={values[CHUNK_PROP]!r} is not "
                              f"'<index>/<count>'")
        index, count = int(index_text), int(count_text)
        if not 1 <= count <= MAX_CHUNKS or index >= count:
            raise FormatError(f"chunk {index}/{count} is out of range "
                              f"(0 <= index < count <= {MAX_CHUNKS})")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise FormatError(f"user property {CHUNK_SHA_PROP} must be 64 lowercase hex digits")
        if not size_text.isdigit() or not 0 < int(size_text) <= MAX_SEGMENT_BYTES:
            raise FormatError(f"user property {CHUNK_SIZE_PROP}={size_text!r} must be an integer "
                              f"1..{MAX_SEGMENT_BYTES}")
        return cls(index=index, count=count, blob_sha256=sha, blob_bytes=int(size_text))


def chunk_bounds(total: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of the chunks of a ``total``-byte blob (one if it fits)."""
    if total <= chunk_bytes:
        return [(0, total)]
    return [(start, min(total, start + chunk_bytes)) for start in range(0, total, chunk_bytes)]


# -- events and the HTTPS transport -------------------------------------------------------------

HTTPS_PATH_RE = re.compile(r"^/v1/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})/seg/(\d{1,12})$")


def https_segment_path(dev: str, seq: int) -> str:
    return f"/v1/{dev}/seg/{seq}"


@dataclass(frozen=True)
class LossEvent:
    """``rec/v1/<dev>/event``: segments the box dropped (disk-full policy) before sending."""

    first_seq: int
    last_seq: int
    reason: str
    ts: float
    kind: Literal["segments-lost"] = "segments-lost"
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> LossEvent:
        obj = _load_object(payload, "event")
        try:
            first, last = int(obj["first_seq"]), int(obj["last_seq"])
            reason, ts = str(obj["reason"]), float(obj["ts"])
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"event message is missing or has a bad field: {err}") from err
        if obj.get("kind") != "segments-lost" or not 0 <= first <= last:
            raise FormatError("event must be kind 'segments-lost' with 0 <= first_seq <= last_seq")
        return cls(first_seq=first, last_seq=last, reason=reason, ts=ts)
