"""The web's login log: who logged in, and failed logins, from which address.

(Listens and downloads go to the archive's access log, :mod:`central.accesslog`.)
Append-only JSON lines in ``<home>/web/logins.log`` (mode 0600), each entry carrying the SHA-256
of the previous line so an edited or removed entry breaks the chain; each entry fsynced.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from central.home import Home

LOGIN_LOG = "web/logins.log"
_LOCK = threading.Lock()


def _path(home: Home) -> Path:
    return home.root / LOGIN_LOG


def append(home: Home, *, user: str, action: str, call_id: str | None = None,
           device: str | None = None, reason: str | None = None, addr: str | None = None,
           detail: str | None = None) -> dict[str, Any]:
    path = _path(home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _LOCK:
        prev = "0" * 64
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - 65536))
                last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            prev = hashlib.sha256(last).hexdigest()
        entry = {"time_ns": time.time_ns(), "user": user, "action": action, "call_id": call_id,
                 "device": device, "reason": reason, "addr": addr, "detail": detail, "prev": prev}
        line = json.dumps(entry, sort_keys=True).encode() + b"\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            # Durability: a login attempt is on disk before it is answered.
            os.fsync(fd)
        finally:
            os.close(fd)
    return entry


def read(home: Home, *, call_id: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
    """Entries, newest first, each with ``chain_ok`` telling whether it links to the one before."""
    path = _path(home)
    if not path.is_file():
        return []
    out, prev = [], "0" * 64
    for raw in path.read_bytes().splitlines():
        entry = json.loads(raw)
        entry["chain_ok"] = entry.get("prev") == prev
        entry["time"] = dt.datetime.fromtimestamp(entry["time_ns"] / 1e9, dt.UTC).isoformat(
            timespec="seconds")
        prev = hashlib.sha256(raw).hexdigest()
        if call_id not in (None, entry["call_id"]) or user not in (None, entry["user"]):
            continue
        out.append(entry)
    return out[::-1]
