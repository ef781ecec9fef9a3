"""Who read or exported which call, when and why: ``<home>/logs/access.jsonl``.

Every export and every read of audio (``appliance-central export``, and the web page when it
plays a call) appends one entry *before* the audio is handed out, through :func:`record`: a
read that cannot be logged does not happen. The log is hash-chained and fsynced
(:mod:`central.chainlog`). Retention never deletes it: it is kept for the life of the archive,
beyond the 12 months PCI DSS asks for audit trails.
"""

from __future__ import annotations

import datetime as dt
import getpass
import time
from dataclasses import dataclass

from central.chainlog import ChainLog, LogProblem
from central.home import Home
from linerec_contract.errors import UsageError

ACTIONS = ("export", "play", "download")
MAX_TEXT = 500


@dataclass(frozen=True)
class AccessEntry:
    n: int
    at: str  # ISO time, UTC
    at_ns: int
    user: str
    action: str
    device: str
    call_id: str
    reason: str
    detail: str


def access_log(home: Home) -> ChainLog:
    return ChainLog(home, "access")


def current_user(given: str | None = None) -> str:
    """``given`` (``--user``, or the web page's signed-in user), else the OS account."""
    if given:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def record(home: Home, *, action: str, device: str, call_id: str, reason: str,
           user: str | None = None, detail: str = "") -> AccessEntry:
    """Append one access; raises (and nothing may be handed out) when it cannot be logged."""
    reason = " ".join((reason or "").split())
    if not reason:
        raise UsageError("--reason is required: say why this call is read (it goes into the "
                         "access log)")
    if len(reason) > MAX_TEXT:
        raise UsageError(f"--reason is {len(reason)} characters; at most {MAX_TEXT}")
    if action not in ACTIONS:
        raise ValueError(f"unknown access action {action!r}")
    now = time.time_ns()
    entry = access_log(home).append({
        "at": dt.datetime.fromtimestamp(now / 1e9, dt.UTC).isoformat(timespec="milliseconds"),
        "at_ns": now, "user": current_user(user)[:MAX_TEXT], "action": action,
        "device": device, "call_id": call_id, "reason": reason, "detail": detail[:MAX_TEXT],
    })
    return _entry(entry)


def _entry(e: dict[str, object]) -> AccessEntry:
    return AccessEntry(n=int(str(e["n"])), at=str(e["at"]), at_ns=int(str(e["at_ns"])),
                       user=str(e["user"]), action=str(e["action"]), device=str(e["device"]),
                       call_id=str(e["call_id"]), reason=str(e["reason"]),
                       detail=str(e.get("detail", "")))


def entries(home: Home) -> list[AccessEntry]:
    out = []
    for e in access_log(home).entries():
        try:
            out.append(_entry(e))
        except (KeyError, ValueError):
            continue  # verify() names it
    return out


def verify(home: Home) -> list[LogProblem]:
    return access_log(home).verify()
