"""The sqlite index of the archive: segments, and the calls derived from them.

The store is the truth; this index only makes finding things fast. ``rebuild_index`` recreates
it from the store at any time, and ``Index.check`` lists where the two disagree. The database
runs in WAL mode with ``synchronous=FULL`` so a committed row survives a power cut; a row may
still lag the store (a crash between store and index), which ``check`` reports and a rebuild
repairs.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.home import Home
from central.store import Store, StoredRef, StoreError
from linerec_contract.errors import ApplianceError, VerificationError
from linerec_contract.segment import SealedSegment
from linerec_contract.verify import verify_trusted

SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    line TEXT NOT NULL,
    call_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    last_part INTEGER NOT NULL,
    start_frame INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    rate INTEGER NOT NULL,
    codec TEXT NOT NULL,
    manifest_path TEXT NOT NULL,
    payload_path TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS segments_call ON segments (call_id, device, part);
CREATE VIEW IF NOT EXISTS calls AS
SELECT device, line, call_id,
       MIN(start_ns) AS start_ns,
       SUM(frames) AS frames,
       MIN(rate) AS rate,
       COUNT(*) AS parts,
       (MIN(part) = 0 AND COUNT(DISTINCT part) = MAX(part) + 1 AND COUNT(*) = MAX(part) + 1
        AND SUM(last_part) = 1 AND MAX(CASE WHEN last_part THEN part END) = MAX(part)
        AND SUM(status <> 'ok') = 0) AS complete
FROM segments GROUP BY device, line, call_id;
"""

SEGMENT_COLUMNS = (
    "device",
    "seq",
    "line",
    "call_id",
    "part",
    "last_part",
    "start_frame",
    "start_ns",
    "end_ns",
    "frames",
    "rate",
    "codec",
    "manifest_path",
    "payload_path",
    "payload_sha256",
    "manifest_sha256",
    "status",
)

# Built once from the fixed column names above (no user input reaches this text).
INSERT_SEGMENT = "INSERT OR REPLACE INTO segments ({}) VALUES ({})".format(  # noqa: S608
    ", ".join(SEGMENT_COLUMNS), ", ".join(f":{c}" for c in SEGMENT_COLUMNS)
)


class IndexDbError(ApplianceError):
    """The index database cannot be opened or written."""


@dataclass(frozen=True)
class CallRow:
    device: str
    line: str
    call_id: str
    start_ns: int
    frames: int
    rate: int
    parts: int
    complete: bool

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate if self.rate else 0.0


@dataclass(frozen=True)
class IndexIssue:
    """One disagreement between index and store (kinds: missing, stale, orphan)."""

    kind: str
    device: str
    seq: int
    detail: str


def segment_row(seg: SealedSegment, ref: StoredRef, status: str) -> dict[str, Any]:
    """The index row of a stored segment, from its manifest."""
    m = seg.manifest
    return {
        "device": seg.device_id,
        "seq": seg.seq,
        "line": str(m["line"]),
        "call_id": str(m["call_id"]),
        "part": int(m["part"]),
        "last_part": int(bool(m["last_part"])),
        "start_frame": int(m["start_frame"]),
        "start_ns": int(m["start_wall_ns"]),
        "end_ns": int(m["end_wall_ns"]),
        "frames": int(m["frames"]),
        "rate": int(m["sample_rate"]),
        "codec": str(m["codec"]),
        "manifest_path": str(ref.manifest_path),
        "payload_path": str(ref.payload_path),
        "payload_sha256": str(m["payload_sha256"]),
        "manifest_sha256": seg.manifest_sha256,
        "status": status,
    }


def segment_status(home: Home, seg: SealedSegment) -> str:
    """'ok' when the enrolled key verifies ``seg``, otherwise a short reason."""
    device = home.device(seg.device_id)
    if device is None:
        return "unknown device"
    try:
        verify_trusted(seg, device.trust())
    except VerificationError as err:
        return f"bad: {err}"
    return "ok"


class Index:
    """A connection to ``home.index_path``. Not shared between threads concurrently."""

    def __init__(self, path: Path, *, check_same_thread: bool = True) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, timeout=30, check_same_thread=check_same_thread)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # Durability: FULL syncs the WAL at every commit: an indexed row survives a power cut.
            self.db.execute("PRAGMA synchronous=FULL")
            with self.db:
                self.db.executescript(SCHEMA)
        except sqlite3.Error as err:
            raise IndexDbError(
                f"{path}: cannot open the index: {err} (rebuild it: reindex)"
            ) from err

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, seg: SealedSegment, ref: StoredRef, status: str = "ok") -> None:
        self.add_rows([segment_row(seg, ref, status)])

    def add_rows(self, rows: Iterable[dict[str, Any]], *, replace_all: bool = False) -> None:
        try:
            with self.db:
                if replace_all:
                    self.db.execute("DELETE FROM segments")
                self.db.executemany(INSERT_SEGMENT, rows)
        except sqlite3.Error as err:
            raise IndexDbError(f"{self.path}: cannot write the index: {err}") from err

    def segments(self, device: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM segments"
        args: tuple[Any, ...] = ()
        if device is not None:
            sql += " WHERE device = ?"
            args = (device,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY device, seq", args)]

    def call_segments(self, call_id: str, device: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM segments WHERE call_id = ?"
        args: tuple[Any, ...] = (call_id,)
        if device is not None:
            sql += " AND device = ?"
            args += (device,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY device, part, seq", args)]

    def calls(
        self, device: str | None = None, line: str | None = None, since_ns: int | None = None
    ) -> list[CallRow]:
        where, args = [], []
        for clause, value in (
            ("device = ?", device),
            ("line = ?", line),
            ("start_ns >= ?", since_ns),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        # Only the fixed clauses above are joined; values travel as parameters.
        sql = "SELECT * FROM calls" + (" WHERE " + " AND ".join(where) if where else "")  # noqa: S608
        return [
            CallRow(
                device=r["device"],
                line=r["line"],
                call_id=r["call_id"],
                start_ns=r["start_ns"],
                frames=r["frames"],
                rate=r["rate"],
                parts=r["parts"],
                complete=bool(r["complete"]),
            )
            for r in self.db.execute(sql + " ORDER BY start_ns, device, call_id", args)
        ]

    def check(self, store: Store) -> list[IndexIssue]:
        """Compare the index with the store (the truth). Empty list: they agree."""
        issues: list[IndexIssue] = []
        indexed = {(r["device"], r["seq"]): r for r in self.segments()}
        for ref in store.iter_refs():
            row = indexed.pop((ref.device_id, ref.seq), None)
            if row is None:
                issues.append(
                    IndexIssue("missing", ref.device_id, ref.seq, "stored but not indexed")
                )
                continue
            try:
                sha = store.load_ref(ref).manifest_sha256
            except StoreError as err:
                issues.append(IndexIssue("unreadable", ref.device_id, ref.seq, str(err)))
                continue
            if row["manifest_sha256"] != sha or row["manifest_path"] != str(ref.manifest_path):
                issues.append(
                    IndexIssue("stale", ref.device_id, ref.seq, "index row differs from store")
                )
        issues.extend(
            IndexIssue("orphan", dev, seq, "indexed but not in the store")
            for dev, seq in sorted(indexed)
        )
        return issues


def rebuild_index(home: Home) -> int:
    """Recreate the index from the store in one transaction; returns the number of segments.

    Every segment is re-verified against its enrolled key, so the status column is fresh.
    An index file sqlite cannot open at all is moved aside (it is derived data) and replaced.
    """
    store = Store(home)
    rows = []
    for ref in store.iter_refs():
        seg = store.load_ref(ref)
        rows.append(segment_row(seg, ref, segment_status(home, seg)))
    try:
        index = Index(home.index_path)
    except IndexDbError:
        aside = home.index_path.with_name(f"index.sqlite.corrupt-{int(time.time())}")
        home.index_path.rename(aside)
        for suffix in ("-wal", "-shm"):
            extra = home.index_path.with_name(home.index_path.name + suffix)
            if extra.exists():
                extra.rename(aside.with_name(aside.name + suffix))
        index = Index(home.index_path)
    with index:
        index.add_rows(rows, replace_all=True)
    return len(rows)
