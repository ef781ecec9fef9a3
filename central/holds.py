"""Legal holds: calls that retention must keep whatever the policy says.

A hold names one call (``--call ID`` with its device when the id is not unique) or a device,
optionally limited to calls starting in ``[since, until)``. Holds are kept as events (added,
removed) in a signed, hash-chained log (``<home>/logs/holds.jsonl``, :mod:`central.chainlog`),
so who placed or lifted a hold, when and why, stays provable; the current holds are the
added ones not removed since.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from central.accesslog import current_user
from central.chainlog import ChainLog, LogProblem
from central.home import Home
from central.search import CallRecord, check_device, find_call
from linerec_contract.errors import UsageError


@dataclass(frozen=True)
class Hold:
    hold_id: str
    device: str
    call_id: str | None
    since_ns: int | None
    until_ns: int | None
    reason: str
    by: str
    at: str

    def covers(self, call: CallRecord) -> bool:
        if call.device != self.device:
            return False
        if self.call_id is not None:
            return call.call_id == self.call_id
        if self.since_ns is not None and call.start_ns < self.since_ns:
            return False
        return self.until_ns is None or call.start_ns < self.until_ns

    def describe(self) -> str:
        if self.call_id is not None:
            return f"call {self.call_id} on {self.device}"
        span = ""
        if self.since_ns is not None or self.until_ns is not None:
            lo = _iso(self.since_ns) if self.since_ns is not None else "the start"
            hi = _iso(self.until_ns) if self.until_ns is not None else "now"
            span = f" from {lo} until {hi}"
        return f"device {self.device}{span}"


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds")


def hold_log(home: Home) -> ChainLog:
    return ChainLog(home, "holds", signed=True)


def _reason(reason: str) -> str:
    text = " ".join((reason or "").split())
    if not text:
        raise UsageError("--reason is required: say why (case number, request)")
    if len(text) > 500:
        raise UsageError(f"--reason is {len(text)} characters; at most 500")
    return text


def list_holds(home: Home) -> list[Hold]:
    """The holds in force, oldest first."""
    active: dict[str, Hold] = {}
    for e in hold_log(home).entries():
        if e.get("event") == "add":
            hold_id = f"H{int(e['n']) + 1}"  # the line number: unique, given under the lock
            active[hold_id] = Hold(
                hold_id=hold_id, device=str(e["device"]),
                call_id=e.get("call_id"), since_ns=e.get("since_ns"), until_ns=e.get("until_ns"),
                reason=str(e["reason"]), by=str(e["by"]), at=str(e["at"]))
        elif e.get("event") == "remove":
            active.pop(str(e["hold_id"]), None)
    return list(active.values())


def add_hold(home: Home, *, reason: str, call_id: str | None = None, device: str | None = None,
             since_ns: int | None = None, until_ns: int | None = None,
             user: str | None = None) -> Hold:
    text = _reason(reason)
    if call_id is not None:
        if since_ns is not None or until_ns is not None:
            raise UsageError("hold add: --since/--until go with --device, not with --call")
        device = find_call(home, call_id, device).device
    elif device is None:
        raise UsageError("hold add: give --call ID or --device DEV")
    else:
        check_device(home, device)
    if since_ns is not None and until_ns is not None and until_ns <= since_ns:
        raise UsageError("--until must be later than --since")
    now = dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat(timespec="seconds")
    entry = hold_log(home).append({"event": "add", "device": device,
                        "call_id": call_id, "since_ns": since_ns, "until_ns": until_ns,
                        "reason": text, "by": current_user(user), "at": now})
    return Hold(hold_id=f"H{int(entry['n']) + 1}", device=device, call_id=call_id,
                since_ns=since_ns, until_ns=until_ns, reason=text, by=str(entry["by"]), at=now)


def remove_hold(home: Home, hold_id: str, *, reason: str, user: str | None = None) -> Hold:
    text = _reason(reason)
    held = {h.hold_id: h for h in list_holds(home)}
    if hold_id not in held:
        raise UsageError(f"no hold {hold_id!r} in force (list them with: hold ls)")
    now = dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat(timespec="seconds")
    hold_log(home).append({"event": "remove", "hold_id": hold_id, "reason": text,
                           "by": current_user(user), "at": now})
    return held[hold_id]


def verify_holds(home: Home) -> list[LogProblem]:
    return hold_log(home).verify()
