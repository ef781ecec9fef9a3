"""The segment manifest: its fields, their schema, and the check that enforces it.

A manifest is a flat JSON object (``format`` = ``rec-segment/1``) encoded as canonical JSON,
hashed and signed. Every field is listed in :data:`REQUIRED`; ``next_signing_key`` is the only
optional one. The schema is written down in ``docs/segment-format.md``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from linerec_contract.codec import CODECS, MAX_RATE
from linerec_contract.errors import FormatError
from linerec_contract.identity import key_id_for_public

FORMAT = "rec-segment/1"
FIRST_SEQ = 0  # a device's first segment has seq 0 and prev_manifest_sha256 null
MAX_SEQ = 10**12 - 1  # the largest segment number (12 decimal digits, as in file names)
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # as in linerec_contract.protocol
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SIGNING_KEY_ID_RE = re.compile(r"^ed25519:[0-9a-f]{16}$")
RECIPIENT_ID_RE = re.compile(r"^age:[0-9a-f]{16}$")
MAX_TEXT = 128
MAX_GAPS = 1000
MAX_RECIPIENTS = 16
MAX_SEALED_META = 64 * 1024
MIN_LEAK_DIGITS = 6


def _int(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {type(value).__name__}"
        if value < lo or (hi is not None and value > hi):
            return f"is {value}; accepted {lo}..{hi if hi is not None else 'max'}"
        return None

    return check


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT:
        return f"must be a string of 1..{MAX_TEXT} characters"
    if any(ord(ch) < 0x20 for ch in value):
        return "must not contain control characters"
    return None


def _matches(pattern: re.Pattern[str], accepted: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            return f"is {str(value)[:70]!r}; accepted {accepted}"
        return None

    return check


def _one_of(*choices: object) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or value not in choices:
            return f"is {str(value)[:40]!r}; accepted: {', '.join(map(str, choices))}"
        return None

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _prev(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and SHA256_RE.fullmatch(value)):
        return None
    return "must be null or 64 lowercase hex digits"


def _recipients(value: Any) -> str | None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RECIPIENTS:
        return f"must be a list of 1..{MAX_RECIPIENTS} recipient key ids"
    for item in value:
        if not isinstance(item, str) or not RECIPIENT_ID_RE.fullmatch(item):
            return f"holds {str(item)[:40]!r}; accepted age:<16 hex digits>"
    if len(set(value)) != len(value):
        return "lists a recipient twice"
    return None


def _b64(value: Any) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SEALED_META:
        return f"must be base64 text of 1..{MAX_SEALED_META} characters"
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return "is not standard base64"
    if base64.b64encode(raw).decode("ascii") != value:
        return "is not canonical base64"
    return None


def check_gap(gap: Any, seq: int | None = None) -> str | None:
    """Why ``gap`` is not a valid gap record, or None."""
    if not isinstance(gap, dict):
        return "must be an object"
    if _text(gap.get("reason")) is not None:
        return "needs 'reason', a string of 1..128 characters"
    for key, value in gap.items():
        if key == "lost_seq":
            ok = (
                isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                and 0 <= value[0] <= value[1] and (seq is None or value[1] < seq)
            )
            if not ok:
                return "'lost_seq' must be [first, last] with 0 <= first <= last < seq"
        elif key in ("frames", "at_frame"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return f"{key!r} must be a non-negative integer"
        elif not (value is None or isinstance(value, bool | int | str)):
            return f"{key[:40]!r} must be a string, integer, boolean or null"
    return None


def _gaps(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > MAX_GAPS:
        return f"must be a list of at most {MAX_GAPS} gap records"
    for index, gap in enumerate(value):
        problem = check_gap(gap)
        if problem:
            return f"[{index}] {problem}"
    return None


def _next_key(value: Any) -> str | None:
    if not isinstance(value, dict) or set(value) != {"key_id", "public_b64"}:
        return "must be an object with exactly key_id and public_b64"
    try:
        expected = key_id_for_public(str(value["public_b64"]))
    except FormatError as err:
        return f"public_b64: {err}"
    if value["key_id"] != expected:
        return f"key_id {str(value['key_id'])[:40]!r} does not match public_b64 ({expected})"
    return None


_SHA = _matches(SHA256_RE, "64 lowercase hex digits")

REQUIRED: dict[str, Callable[[Any], str | None]] = {
    "format": _one_of(FORMAT),
    "device_id": _matches(DEVICE_ID_RE, "letters, digits, '_.-', at most 63"),
    "seq": _int(FIRST_SEQ, MAX_SEQ),
    "line": _text,
    "call_id": _text,
    "part": _int(0),
    "last_part": _bool,
    "start_frame": _int(0),
    "frames": _int(1),
    "start_wall_ns": _int(0),
    "end_wall_ns": _int(0),
    "sample_rate": _int(1, MAX_RATE),
    "channels": _one_of(1),
    "codec": _one_of(*CODECS),
    "audio_bytes": _int(1),
    "payload_bytes": _int(1),
    "payload_sha256": _SHA,
    "prev_manifest_sha256": _prev,
    "recipients": _recipients,
    "signing_key_id": _matches(SIGNING_KEY_ID_RE, "ed25519:<16 hex digits>"),
    "sealed_meta": _b64,
    "gaps": _gaps,
    "created_wall_ns": _int(0),
}
OPTIONAL: dict[str, Callable[[Any], str | None]] = {"next_signing_key": _next_key}


def validate_manifest(manifest: Any) -> None:
    """Raise FormatError naming the first field that breaks the ``rec-segment/1`` schema."""
    if not isinstance(manifest, dict):
        raise FormatError(f"manifest must be a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise FormatError(f"manifest format {str(fmt)[:40]!r} is not supported; accepted {FORMAT}")
    unknown = sorted(set(manifest) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise FormatError(f"manifest has unknown field {unknown[0][:40]!r} for {FORMAT}")
    for name, check in REQUIRED.items():
        if name not in manifest:
            raise FormatError(f"manifest is missing field {name!r}")
        problem = check(manifest[name])
        if problem:
            raise FormatError(f"manifest field {name!r} {problem}")
    for name, check in OPTIONAL.items():
        if name in manifest:
            problem = check(manifest[name])
            if problem:
                raise FormatError(f"manifest field {name!r} {problem}")
    if manifest["end_wall_ns"] < manifest["start_wall_ns"]:
        raise FormatError("manifest field 'end_wall_ns' is before 'start_wall_ns'")
    for index, gap in enumerate(manifest["gaps"]):
        problem = check_gap(gap, manifest["seq"])
        if problem:
            raise FormatError(f"manifest field 'gaps' [{index}] {problem}")
    if (manifest["seq"] == FIRST_SEQ) != (manifest["prev_manifest_sha256"] is None):
        raise FormatError(
            f"manifest field 'prev_manifest_sha256' must be null exactly when seq is {FIRST_SEQ}"
        )


def sensitive_leaves(sensitive: Any) -> list[str]:
    """Strings to look for in clear fields: each long value of ``sensitive``, and its digits.

    Only values with at least :data:`MIN_LEAK_DIGITS` characters (or digits) are checked, so
    that a short PIN cannot collide with a counter in a call id and block sealing.
    """
    out: list[str] = []
    stack = [sensitive]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str | int) and not isinstance(item, bool):
            text = str(item)
            digits = "".join(ch for ch in text if ch.isdigit())
            out.extend(v for v in (text, digits) if len(v) >= MIN_LEAK_DIGITS)
    return out
