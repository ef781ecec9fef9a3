"""Append-only, hash-chained logs of the archive (access log, deletion log), and central's own
signing key.

Each log is a file of canonical JSON lines under ``<home>/logs/``. Every entry carries ``n``
(its number, from 0), ``prev`` (SHA-256 of the previous line's bytes, 64 zeros for the first)
and, when the log is signed, ``sig``: central's Ed25519 signature over the entry without
``sig``, with ``key_id`` naming the key. An appended line is fsynced before the call returns;
appends from several processes are serialised by a lock file. Removing, changing, reordering
or inserting a line breaks the chain at that line, which :func:`verify_log` names; a signed
entry whose signature fails is named too (someone who rewrote the whole tail would also need
central's key).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.home import Home, make_dirs
from central.store import exclusive_lock
from linerec_contract.canonical import canonical_json
from linerec_contract.durable import fsync_dir
from linerec_contract.errors import FormatError, StateDirError
from linerec_contract.identity import DeviceKey, key_id_for_public, verify_signature

ZERO = "0" * 64
SIGNING_KEY = "central-signing.key"


def central_key(home: Home) -> DeviceKey:
    """Central's Ed25519 key (``keys/central-signing.key``, 0600), created on first use.

    It signs the deletion log and export proofs; its public half is in each signed record."""
    return DeviceKey.load_or_create(home.root / "keys" / SIGNING_KEY)


@dataclass(frozen=True)
class LogProblem:
    line: int  # 1-based line of the file
    detail: str


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _read_lines(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StateDirError(f"{path}: cannot read: {err.strerror}") from err
    return data.splitlines()


class ChainLog:
    """One log file; ``signed`` logs carry central's signature on every entry."""

    def __init__(self, home: Home, name: str, *, signed: bool = False) -> None:
        self.home = home
        self.path = home.root / "logs" / f"{name}.jsonl"
        self.lock = home.root / "locks" / f"log-{name}.lock"
        self.signed = signed

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Append one entry (``fields`` plus n, prev and the signature); durable on return."""
        make_dirs(self.path.parent)
        key = central_key(self.home) if self.signed else None
        with exclusive_lock(self.lock):
            lines = _read_lines(self.path)
            if lines and not self._ends_clean():
                raise StateDirError(f"{self.path}: the last line is cut (a crash while "
                                    "writing?); check it with the log's verify")
            entry = dict(fields, n=len(lines), prev=_line_hash(lines[-1]) if lines else ZERO)
            if key is not None:
                entry["key_id"] = key.key_id
                entry["public_key"] = key.public_b64
                entry["sig"] = base64.b64encode(key.sign(canonical_json(entry))).decode()
            line = canonical_json(entry) + b"\n"
            new = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                # Durability: an access or a deletion is on disk before it is reported done.
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)
        return entry

    def _ends_clean(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def entries(self) -> list[dict[str, Any]]:
        """Every entry that parses (see :meth:`verify` for whether they are intact)."""
        out = []
        for line in _read_lines(self.path):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def verify(self, pinned_key_id: str | None = None) -> list[LogProblem]:
        """Where the file breaks the chain or a signature; empty when intact."""
        problems = []
        prev = ZERO
        pinned = pinned_key_id or (central_key(self.home).key_id if self.signed else None)
        for number, line in enumerate(_read_lines(self.path)):
            where = number + 1
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or canonical_json(entry) != line:
                    raise ValueError("not a canonical JSON object")
            except (ValueError, FormatError) as err:
                problems.append(LogProblem(where, f"unreadable entry: {err}"))
                prev = _line_hash(line)
                continue
            if entry.get("n") != number:
                problems.append(LogProblem(where, f"entry number {entry.get('n')}, expected "
                                           f"{number}: a line was removed or inserted"))
            if entry.get("prev") != prev:
                problems.append(LogProblem(where, "does not link to the line before it: "
                                           "an earlier line was changed, removed or reordered"))
            if self.signed:
                problems.extend(LogProblem(where, d) for d in _signature_problems(entry, pinned))
            prev = _line_hash(line)
        return problems

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.entries())


def _signature_problems(entry: dict[str, Any], pinned: str | None) -> list[str]:
    body = {k: v for k, v in entry.items() if k != "sig"}
    try:
        public, sig = str(entry["public_key"]), base64.b64decode(str(entry["sig"]), validate=True)
        ok = verify_signature(public, sig, canonical_json(body))
    except (KeyError, ValueError, FormatError):
        return ["has no valid signature"]
    out = []
    if key_id_for_public(public) != entry.get("key_id"):
        out.append("its key_id does not name the public key it carries")
    if not ok:
        out.append("signature does not verify: the entry was changed after central signed it")
    if pinned is not None and entry.get("key_id") != pinned:
        out.append(f"signed by {entry.get('key_id')}, not by central's key {pinned}")
    return out
