"""Canonical JSON: the one byte encoding that manifests are hashed and signed in.

Rules (also in ``docs/segment-format.md``): object keys sorted by code point, no whitespace,
UTF-8 without ``\\u`` escapes for non-ASCII, integers only (no floats, NaN or infinities) within
the signed 64-bit range, strings without lone surrogates. Anything else is rejected with a
:class:`~linerec_contract.errors.FormatError` naming the offending path, so a value that could be
encoded two ways never reaches a signature.
"""

from __future__ import annotations

import json
from typing import Any

from linerec_contract.errors import FormatError

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
MAX_DEPTH = 32


def _check(value: object, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FormatError(f"value at {path} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise FormatError(f"integer at {path} is outside the signed 64-bit range")
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise FormatError(f"string at {path} is not valid Unicode (lone surrogate)") from err
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"key {key!r} at {path} is not a string; JSON keys are strings")
            _check(key, f"{path}.{key}", depth + 1)
            _check(item, f"{path}.{key}", depth + 1)
        return
    raise FormatError(
        f"value at {path} has type {type(value).__name__}; canonical JSON accepts "
        "dict, list, str, int, bool and None (no floats)"
    )


def canonical_json(obj: object) -> bytes:
    """Encode ``obj`` as canonical JSON bytes (sorted keys, no spaces, UTF-8, integers only)."""
    _check(obj, "$", 0)
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise FormatError(f"JSON constant {name} is not allowed; canonical JSON has integers only")


def _reject_float(text: str) -> Any:
    raise FormatError(f"JSON number {text[:20]} is not an integer; only integers are accepted")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"JSON object has the key {key[:40]!r} twice; keys must be unique")
        out[key] = value
    return out


def parse_canonical(data: bytes, what: str) -> Any:
    """Parse ``data`` and insist it is exactly the canonical encoding of what it holds."""
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            parse_float=_reject_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except UnicodeDecodeError as err:
        raise FormatError(f"{what} is not UTF-8: {err.reason} at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise FormatError(f"{what} is not JSON: {err.msg} at byte {err.pos}") from err
    except ValueError as err:  # e.g. an integer longer than Python's digit limit
        raise FormatError(f"{what} is not acceptable JSON: {err}") from err
    except RecursionError as err:
        raise FormatError(f"{what} is nested too deeply to be a manifest") from err
    except FormatError as err:
        raise FormatError(f"{what}: {err}") from err
    try:
        again = canonical_json(value)
    except FormatError as err:
        raise FormatError(f"{what}: {err}") from err
    if again != data:
        raise FormatError(
            f"{what} is not in canonical form (sorted keys, no spaces, no escapes of UTF-8 text)"
        )
    return value
