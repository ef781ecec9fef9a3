"""MQTT topic names and the small typed messages exchanged between box and central.

The wire protocol is written down in ``docs/protocol.md``; this module is the one place that
encodes and decodes it. Every message carries a version ``v``; a message that does not parse
raises :class:`~linerec_contract.errors.FormatError` with a one-line reason (never returns ``None``).

Everything that arrives from the network is checked here before any other code uses it: numbers
are ASCII decimal digits only (``str.isdigit`` and ``int`` also accept ``'²'`` or ``'٣'``) and
within their documented range, names match their pattern in full, and sizes are bounded.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from linerec_contract.errors import FormatError
from linerec_contract.manifest import MAX_SEQ

PROTOCOL_VERSION = 1
TOPIC_ROOT = "rec/v1"
MAX_CONTROL_MESSAGE = 64 * 1024
MAX_TOPIC_LENGTH = 256
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*")


def parse_decimal(text: str, what: str, lo: int, hi: int) -> int:
    """A canonical ASCII decimal number (no sign, no leading zeros) in ``lo..hi``."""
    if not isinstance(text, str) or len(text) > len(str(hi)) or not _DECIMAL_RE.fullmatch(text):
        shown = text[:40] if isinstance(text, str) else type(text).__name__
        raise FormatError(f"{what} {shown!r} is not a decimal number {lo}..{hi} (ASCII digits)")
    value = int(text)
    if not lo <= value <= hi:
        raise FormatError(f"{what} {value} is outside {lo}..{hi}")
    return value


def check_int(value: Any, what: str, lo: int, hi: int) -> int:
    """A JSON integer (not a bool, not a float) in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer {lo}..{hi}, got {str(value)[:40]!r}")
    return value

AckResult = Literal["stored", "duplicate", "rejected"]
ACK_RESULTS: tuple[str, ...] = ("stored", "duplicate", "rejected")


MAX_KEEPALIVE_S = 65535  # MQTT's keep-alive is a 16-bit number of seconds


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


def topic_device(topic: str) -> str:
    """The device id of any ``rec/v1/<dev>/...`` topic (the broker's ACL binds it to the
    sender's certificate); FormatError when there is none."""
    parts = topic.split("/", 3) if isinstance(topic, str) else []
    if len(topic) > MAX_TOPIC_LENGTH or len(parts) < 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise FormatError(f"topic {str(topic)[:80]!r} is not under {TOPIC_ROOT}/<dev>/")
    if not DEVICE_ID_RE.match(parts[2]):
        raise FormatError(
            f"device id {parts[2][:80]!r} in topic is invalid (letters, digits, '_.-', max 63)"
        )
    return parts[2]


def parse_segment_topic(topic: str) -> tuple[str, int]:
    """Return ``(device_id, seq)`` from ``rec/v1/<dev>/seg/<seq>``, seq in 0..MAX_SEQ."""
    dev = topic_device(topic)
    parts = topic.split("/")
    if len(parts) != 5 or parts[3] != "seg":
        raise FormatError(
            f"topic {topic[:80]!r} is not a segment topic (expected {TOPIC_ROOT}/<dev>/seg/<seq>)"
        )
    return dev, parse_decimal(parts[4], "segment number in the topic", 0, MAX_SEQ)


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
        seq = check_int(seq, "ack field 'seq'", 0, MAX_SEQ)
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
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
    # The connection's MQTT keep-alive in seconds (0: not declared). A box that declares one
    # sends something (telemetry or a heartbeat) at least every quarter of it, and central shows
    # it offline once nothing arrived for half of it (docs/protocol.md, "Liveness").
    keepalive_s: int = 0
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        obj = _load_object(payload, "status")
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise FormatError(f"status field 'state' must be online or offline, got {state!r}")
        version, boot_id, ts = obj.get("version"), obj.get("boot_id"), obj.get("ts")
        if not (isinstance(version, str) and isinstance(boot_id, str)):
            raise FormatError("status fields 'version' and 'boot_id' must be strings")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 <= ts < 1e11:
            raise FormatError(f"status field 'ts' must be a Unix time, got {str(ts)[:40]!r}")
        session = check_int(obj.get("session"), "status field 'session'", 0, 2**63 - 1)
        config_version = check_int(obj.get("config_version", 0), "status field 'config_version'",
                                   0, 2**63 - 1)
        keepalive_s = check_int(obj.get("keepalive_s", 0), "status field 'keepalive_s'", 0,
                                MAX_KEEPALIVE_S)
        return cls(state=state, version=version, boot_id=boot_id, session=session, ts=float(ts),
                   config_version=config_version, keepalive_s=keepalive_s)


# -- chunking (MQTT v5 user properties on rec/v1/<dev>/seg/<seq>) --------------------------------

CHUNK_PROP = "chunk"  # "<index>/<count>", index 0-based
CHUNK_SHA_PROP = "seg-sha256"  # SHA-256 of the whole wire blob (all chunks joined)
CHUNK_SIZE_PROP = "seg-bytes"  # length of the whole wire blob
MAX_CHUNKS = 4096
MAX_SEGMENT_BYTES = 256 * 1024 * 1024
# The largest MQTT message: one chunk (uplink.chunk_bytes is at most this) plus room for the
# topic and properties. Enforced by the broker (max_packet_size) and by central's client.
MAX_CHUNK_BYTES = 1024 * 1024
MAX_PACKET_BYTES = MAX_CHUNK_BYTES + 16 * 1024


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
        if props is None:
            return None
        if not isinstance(props, list) or len(props) > 16:
            raise FormatError("a segment message carries at most 16 user properties")
        values: dict[str, str] = {}
        for pair in props:
            name, value = pair
            if name in values:
                raise FormatError(f"user property {str(name)[:40]!r} appears twice")
            values[name] = value
        ours = (CHUNK_PROP, CHUNK_SHA_PROP, CHUNK_SIZE_PROP)
        present = [name for name in ours if name in values]
        if not present:
            return None
        if len(present) != len(ours):
            raise FormatError(f"a chunk needs all of the user properties {', '.join(ours)}")
        index_text, slash, count_text = values[CHUNK_PROP].partition("/")
        if not slash:
            raise FormatError(f"user property {CHUNK_PROP}={values[CHUNK_PROP][:40]!r} is not "
                              "'<index>/<count>'")
        count = parse_decimal(count_text, "chunk count", 1, MAX_CHUNKS)
        index = parse_decimal(index_text, "chunk index", 0, count - 1)
        sha = values[CHUNK_SHA_PROP]
        if not SHA256_RE.fullmatch(sha):
            raise FormatError(f"user property {CHUNK_SHA_PROP} must be 64 lowercase hex digits")
        size = parse_decimal(values[CHUNK_SIZE_PROP], f"user property {CHUNK_SIZE_PROP}", 1,
                             MAX_SEGMENT_BYTES)
        if not count <= size <= count * MAX_CHUNK_BYTES:
            raise FormatError(f"a segment of {size} bytes cannot come in {count} chunks of "
                              f"1..{MAX_CHUNK_BYTES} bytes")
        return cls(index=index, count=count, blob_sha256=sha, blob_bytes=size)


def chunk_bounds(total: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of the chunks of a ``total``-byte blob (one if it fits)."""
    if total <= chunk_bytes:
        return [(0, total)]
    return [(start, min(total, start + chunk_bytes)) for start in range(0, total, chunk_bytes)]


# -- events and the HTTPS transport -------------------------------------------------------------

HTTPS_PATH_RE = re.compile(r"^/v1/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})/seg/(0|[1-9][0-9]{0,11})\Z")


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
        first = check_int(obj.get("first_seq"), "event field 'first_seq'", 0, MAX_SEQ)
        last = check_int(obj.get("last_seq"), "event field 'last_seq'", 0, MAX_SEQ)
        reason, ts = obj.get("reason"), obj.get("ts")
        if not isinstance(reason, str):
            raise FormatError("event field 'reason' must be a string")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 <= ts < 1e11:
            raise FormatError(f"event field 'ts' must be a Unix time, got {str(ts)[:40]!r}")
        if obj.get("kind") != "segments-lost" or not first <= last:
            raise FormatError("event must be kind 'segments-lost' with 0 <= first_seq <= last_seq")
        return cls(first_seq=first, last_seq=last, reason=reason, ts=float(ts))
