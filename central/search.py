"""Finding calls by what happened on them: the service behind ``appliance-central calls``.

Each segment's sealed metadata (direction, caller ID, dialled digits) is opened by central with
its own identity when the segment is stored and again by ``reindex``, and kept in the index
(:func:`central.index.meta_row`). Here the parts of each call are joined into one
:class:`CallRecord` and matched against a :class:`CallFilter`. Device, line and time narrow the
query in the index; the remaining filters apply to the joined calls.

Matching rules (the same for the command line and the web page):

* ``since``/``until``: the call's first sample is at or after ``since`` and before ``until``;
* ``caller``/``digits``: the text, reduced to its dial characters (``0-9 * # A-D``), occurs in
  the caller's number / the digits dialled on the call (a call whose digits the box masked has
  none, so it never matches ``digits``);
* ``direction``: ``inbound`` (the box heard ringing or caller ID before the call) or
  ``outbound`` (every other call);
* ``min_duration``/``max_duration``: seconds of recorded audio, both bounds inclusive.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from central.home import Home, check_device_id
from central.index import open_index
from linerec_contract.errors import ConfigError, UsageError

DIRECTIONS = ("inbound", "outbound")
_DIAL = re.compile(r"[^0-9*#A-D]")
# Gap reasons that mean audio was lost (alarms for the reader); pci-* notes are deliberate.
LOSS_REASONS = ("overrun", "corrupt", "xrun", "capture-gap", "spool-lost")


@dataclass(frozen=True)
class CallFilter:
    device: str | None = None
    line: str | None = None
    since_ns: int | None = None
    until_ns: int | None = None
    caller: str | None = None
    digits: str | None = None
    direction: str | None = None
    min_duration_s: float | None = None
    max_duration_s: float | None = None


@dataclass(frozen=True)
class CallPart:
    seq: int
    part: int
    last_part: bool
    start_frame: int
    frames: int
    payload_sha256: str
    manifest_sha256: str
    status: str


@dataclass(frozen=True)
class CallRecord:
    """One call as the archive holds it, its parts joined in part order."""

    device: str
    line: str
    line_label: str
    call_id: str
    start_ns: int
    end_ns: int
    frames: int
    rate: int
    direction: str
    caller_id: str | None
    dialled: str | None
    masked_digits: int
    gaps: list[dict[str, Any]]
    parts: list[CallPart] = field(default_factory=list)
    complete: bool = False
    meta_ok: bool = True

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate if self.rate else 0.0

    @property
    def alarms(self) -> list[str]:
        """The loss reasons among the call's gap notes (audio the box could not keep)."""
        return sorted({str(g.get("reason")) for g in self.gaps if g.get("reason") in LOSS_REASONS})

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["segments"] = out.pop("parts")  # "parts" stays the count, as before
        out["parts"] = len(self.parts)
        out["duration_s"] = round(self.duration_s, 3)
        out["alarms"] = self.alarms
        return out


def dial_chars(text: str) -> str:
    return _DIAL.sub("", text.upper())


def line_labels(home: Home) -> dict[tuple[str, str], str]:
    """``[lines]`` of central.toml: ``"<device>/<line>" = "label"``."""
    if not home.config_path.exists():
        return {}
    try:
        raw = tomllib.loads(home.config_path.read_text(encoding="utf-8")).get("lines", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{home.config_path}: cannot read: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{home.config_path}: [lines] must be a table of \"device/line\" = label")
    out = {}
    for key, label in raw.items():
        dev, sep, line = key.partition("/")
        if not sep or not line or not isinstance(label, str) or len(label) > 80:
            raise ConfigError(f"{home.config_path}: lines.{key!r} must be \"device/line\" = "
                              "a label of at most 80 characters")
        out[(dev, line)] = label
    return out


def check_device(home: Home, device: str) -> None:
    """Usage error unless ``device`` is enrolled or has stored segments."""
    check_device_id(device)
    from central.store import Store

    if home.device(device) is None and device not in Store(home).devices():
        raise UsageError(f"--device {device!r} is not a device of this archive "
                         "(enrolled devices: appliance-central devices; or see: calls)")


def check_filter(home: Home, filt: CallFilter) -> None:
    if filt.device is not None:
        check_device(home, filt.device)
    if filt.direction is not None and filt.direction not in DIRECTIONS:
        raise UsageError(f"--direction {filt.direction!r} is not one of {', '.join(DIRECTIONS)}")
    for name, text in (("caller", filt.caller), ("digits", filt.digits)):
        if text is not None and not dial_chars(text):
            raise UsageError(f"--{name} {text!r} holds no dial characters (0-9 * # A-D)")
    for name, value in (("min-duration", filt.min_duration_s),
                        ("max-duration", filt.max_duration_s)):
        if value is not None and value < 0:
            raise UsageError(f"--{name} {value} must be 0 or more seconds")
    if (filt.since_ns is not None and filt.until_ns is not None
            and filt.until_ns <= filt.since_ns):
        raise UsageError("--until must be later than --since")


def _joined_dialled(values: Iterable[str | None]) -> str | None:
    """The call's digits from its parts in order: a part repeats the call's digits so far."""
    acc = ""
    for value in values:
        if value:
            acc = value if value.startswith(acc) else acc + value
    return acc or None


def join_calls(rows: list[dict[str, Any]], labels: dict[tuple[str, str], str]) -> list[CallRecord]:
    """Index rows (segments with their metadata) -> calls, by start time."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["line"], r["call_id"]), []).append(r)
    calls = []
    for (dev, line, call_id), parts in groups.items():
        parts.sort(key=lambda r: (int(r["part"]), int(r["seq"])))
        numbers = [int(r["part"]) for r in parts]
        complete = (numbers == list(range(len(parts)))
                    and [bool(r["last_part"]) for r in parts] == [False] * (len(parts) - 1) + [True]
                    and all(r["status"] == "ok" for r in parts))
        callers = [r["caller_id"] for r in parts if r["caller_id"]]
        gaps: list[dict[str, Any]] = []
        for r in parts:
            gaps.extend(json.loads(r["gaps"]) if r["gaps"] else [])
        calls.append(CallRecord(
            device=dev, line=line, line_label=labels.get((dev, line), ""), call_id=call_id,
            start_ns=min(int(r["start_ns"]) for r in parts),
            end_ns=max(int(r["end_ns"]) for r in parts),
            frames=sum(int(r["frames"]) for r in parts),
            rate=int(parts[0]["rate"]),
            direction="inbound" if any(r["direction"] == "inbound" for r in parts) else "outbound",
            caller_id=callers[0] if callers else None,
            dialled=_joined_dialled(r["dialled"] for r in parts),
            masked_digits=max(int(r["masked_digits"] or 0) for r in parts),
            gaps=gaps,
            parts=[CallPart(seq=int(r["seq"]), part=int(r["part"]), last_part=bool(r["last_part"]),
                            start_frame=int(r["start_frame"]), frames=int(r["frames"]),
                            payload_sha256=r["payload_sha256"],
                            manifest_sha256=r["manifest_sha256"], status=r["status"])
                   for r in parts],
            complete=complete,
            meta_ok=all(r["meta_status"] == "ok" for r in parts),
        ))
    calls.sort(key=lambda c: (c.start_ns, c.device, c.call_id))
    return calls


def matches(call: CallRecord, filt: CallFilter) -> bool:
    if filt.since_ns is not None and call.start_ns < filt.since_ns:
        return False
    if filt.until_ns is not None and call.start_ns >= filt.until_ns:
        return False
    if filt.direction is not None and call.direction != filt.direction:
        return False
    if filt.caller is not None and dial_chars(filt.caller) not in dial_chars(call.caller_id or ""):
        return False
    if filt.digits is not None and (
        call.dialled is None or dial_chars(filt.digits) not in call.dialled
    ):
        return False
    if filt.min_duration_s is not None and call.duration_s < filt.min_duration_s:
        return False
    return filt.max_duration_s is None or call.duration_s <= filt.max_duration_s


def find_calls(home: Home, filt: CallFilter | None = None) -> list[CallRecord]:
    """The calls of the archive that match ``filt`` (all calls without one), by start time."""
    filt = filt or CallFilter()
    check_filter(home, filt)
    with open_index(home) as index:
        rows = index.segments_with_meta(device=filt.device, line=filt.line)
    return [c for c in join_calls(rows, line_labels(home)) if matches(c, filt)]


def find_call(home: Home, call_id: str, device: str | None = None) -> CallRecord:
    """The one call ``call_id`` (on ``device``); a usage error when none or several match."""
    if device is not None:
        check_device(home, device)
    with open_index(home) as index:
        rows = index.segments_with_meta(device=device, call_id=call_id)
    calls = join_calls(rows, line_labels(home))
    if not calls:
        where = f" on device {device}" if device else ""
        raise UsageError(f"no call {call_id!r}{where} in the index (list them with: calls; "
                         "after changes to the store run: reindex)")
    if len(calls) > 1:
        names = ", ".join(f"{c.device} line {c.line}" for c in calls)
        raise UsageError(f"call id {call_id!r} exists on {names}; choose one with --device")
    return calls[0]
