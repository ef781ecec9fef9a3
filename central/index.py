"""The index of the archive: segments, and the calls derived from them.

The store is the truth; this index only makes finding things fast. ``rebuild_index`` recreates
it from the store alone at any time (``appliance-central reindex``), and ``Index.check`` lists
where the two disagree. Locations are kept as the storage backend names them: relative to the
central home for the filesystem (``store/<dev>/<seq>.manifest.json``), so a copied or restored
home keeps a valid index; ``s3://bucket/key`` for S3.

Two backends, chosen by the ``[index]`` table of ``central.toml`` (see :mod:`central.backends`):

* SQLite (the default), ``<home>/index.sqlite``, in WAL mode with ``synchronous=FULL`` so a
  committed row survives a power cut;
* PostgreSQL, shared by receivers on several machines (``dsn``), with ``synchronous_commit``
  on.

A row may still lag the store (a crash between store and index), which ``check`` reports and a
rebuild repairs.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.backends import index_config, locator
from central.home import Home
from central.store import Store, StoredRef, StoreError
from linerec_contract.canonical import canonical_json
from linerec_contract.errors import ApplianceError, FormatError, VerificationError
from linerec_contract.segment import SealedSegment
from linerec_contract.verify import open_segment_sensitive, verify_trusted

_COLUMNS_SQL = """
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    line TEXT NOT NULL,
    call_id TEXT NOT NULL,
    part INTEGER NOT NULL,
    last_part INTEGER NOT NULL,
    start_frame BIGINT NOT NULL,
    start_ns BIGINT NOT NULL,
    end_ns BIGINT NOT NULL,
    frames BIGINT NOT NULL,
    rate INTEGER NOT NULL,
    codec TEXT NOT NULL,
    manifest_path TEXT NOT NULL,
    payload_path TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (device, seq)
"""

# One definition for both engines (plain SQL, no engine-specific functions).
_CALLS_SELECT = """
SELECT device, line, call_id,
       MIN(start_ns) AS start_ns,
       CAST(SUM(frames) AS BIGINT) AS frames,
       MIN(rate) AS rate,
       COUNT(*) AS parts,
       (MIN(part) = 0 AND COUNT(DISTINCT part) = MAX(part) + 1 AND COUNT(*) = MAX(part) + 1
        AND SUM(last_part) = 1 AND MAX(CASE WHEN last_part = 1 THEN part END) = MAX(part)
        AND SUM(CASE WHEN status <> 'ok' THEN 1 ELSE 0 END) = 0) AS complete
FROM segments GROUP BY device, line, call_id
"""

# What central learns by opening each segment's sealed metadata with its own identity, plus
# the clear gap notes; one row per segment, derived from the store (``reindex`` rebuilds it).
_META_COLUMNS_SQL = """
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    direction TEXT NOT NULL,
    caller_id TEXT,
    dialled TEXT,
    masked_digits INTEGER NOT NULL,
    gaps TEXT NOT NULL,
    meta_status TEXT NOT NULL,
    PRIMARY KEY (device, seq)
"""

SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS segments ({_COLUMNS_SQL});
CREATE TABLE IF NOT EXISTS segment_meta ({_META_COLUMNS_SQL});
CREATE INDEX IF NOT EXISTS segments_call ON segments (call_id, device, part);
CREATE VIEW IF NOT EXISTS calls AS {_CALLS_SELECT};
"""

PG_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS segments ({_COLUMNS_SQL})",
    f"CREATE TABLE IF NOT EXISTS segment_meta ({_META_COLUMNS_SQL})",
    "CREATE INDEX IF NOT EXISTS segments_call ON segments (call_id, device, part)",
    f"CREATE OR REPLACE VIEW calls AS {_CALLS_SELECT}",
)
# Any constant: serialises schema creation between receivers starting at the same moment.
PG_SCHEMA_LOCK = 0x6C696E6572656301

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

META_COLUMNS = (
    "device",
    "seq",
    "direction",
    "caller_id",
    "dialled",
    "masked_digits",
    "gaps",
    "meta_status",
)

# Built once from the fixed column names above (no user input reaches these texts).
INSERT_SEGMENT = "INSERT OR REPLACE INTO segments ({}) VALUES ({})".format(  # noqa: S608
    ", ".join(SEGMENT_COLUMNS), ", ".join(f":{c}" for c in SEGMENT_COLUMNS)
)
PG_UPSERT_SEGMENT = (
    "INSERT INTO segments ({}) VALUES ({}) ON CONFLICT (device, seq) DO UPDATE SET {}".format(  # noqa: S608
        ", ".join(SEGMENT_COLUMNS),
        ", ".join(f"%({c})s" for c in SEGMENT_COLUMNS),
        ", ".join(f"{c} = EXCLUDED.{c}" for c in SEGMENT_COLUMNS[2:]),
    )
)

INSERT_META = "INSERT OR REPLACE INTO segment_meta ({}) VALUES ({})".format(  # noqa: S608
    ", ".join(META_COLUMNS), ", ".join(f":{c}" for c in META_COLUMNS)
)
PG_UPSERT_META = (
    "INSERT INTO segment_meta ({}) VALUES ({}) ON CONFLICT (device, seq) DO UPDATE SET {}".format(  # noqa: S608
        ", ".join(META_COLUMNS),
        ", ".join(f"%({c})s" for c in META_COLUMNS),
        ", ".join(f"{c} = EXCLUDED.{c}" for c in META_COLUMNS[2:]),
    )
)


_WITH_META = (
    "SELECT s.*, m.direction, m.caller_id, m.dialled, m.masked_digits, m.gaps, m.meta_status "
    "FROM segments s LEFT JOIN segment_meta m ON m.device = s.device AND m.seq = s.seq"
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
    """One disagreement between index and store (kinds: missing, stale, orphan, unreadable)."""

    kind: str
    device: str
    seq: int
    detail: str


def _filesystem_location(key: str) -> str:
    return f"store/{key}"


def segment_row(
    seg: SealedSegment, ref: StoredRef, status: str,
    locate: Callable[[str], str] = _filesystem_location,
) -> dict[str, Any]:
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
        "manifest_path": locate(ref.manifest_key),
        "payload_path": locate(ref.payload_key),
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


def meta_row(seg: SealedSegment, identity: str | None) -> dict[str, Any]:
    """The segment_meta row of ``seg``: its sealed metadata opened with central's identity.

    ``direction`` is ``inbound`` when the box heard ringing or caller ID before the call,
    otherwise ``outbound``; ``dialled`` is None when the box kept no digits (PCI masking:
    ``masked_digits`` counts them). A sealed_meta central cannot open is indexed with empty
    facts and a ``meta_status`` naming why, never dropped.
    """
    sensitive: dict[str, Any] = {}
    status = "ok"
    if identity is None:
        status = "not opened"
    else:
        try:
            sensitive = open_segment_sensitive(seg, identity)
        except (VerificationError, FormatError) as err:
            status = f"unreadable: {err}"
    caller = sensitive.get("caller_id")
    if isinstance(caller, dict):  # FSK caller ID carries the number and maybe a name
        caller = caller.get("number") or caller.get("name")
    dialled = sensitive.get("dialled")
    masked = sensitive.get("masked_digits", 0)
    return {
        "device": seg.device_id,
        "seq": seg.seq,
        "direction": "inbound" if sensitive.get("direction") == "inbound" else "outbound",
        "caller_id": str(caller) if caller else None,
        "dialled": str(dialled) if dialled else None,
        "masked_digits": int(masked) if isinstance(masked, int) else 0,
        "gaps": canonical_json(list(seg.manifest.get("gaps", []))).decode(),
        "meta_status": status,
    }


class _IndexBase:
    """What both engines answer; subclasses provide ``_query`` and ``add_rows``."""

    where: str
    locate: Callable[[str], str]
    placeholder = "?"

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _IndexBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def add_rows(self, rows: Iterable[dict[str, Any]], *, replace_all: bool = False,
                 meta: Iterable[dict[str, Any]] = ()) -> None:
        raise NotImplementedError

    def add(self, seg: SealedSegment, ref: StoredRef, status: str = "ok",
            identity: str | None = None) -> None:
        """Index one stored segment; with ``identity``, also its sealed metadata."""
        meta = [meta_row(seg, identity)] if identity is not None else []
        self.add_rows([segment_row(seg, ref, status, self.locate)], meta=meta)

    def segments_with_meta(
        self, device: str | None = None, line: str | None = None, call_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Segment rows joined with their metadata (None where not indexed), by device, seq."""
        p = self.placeholder
        where, args = [], []
        for clause, value in ((f"s.device = {p}", device), (f"s.line = {p}", line),
                              (f"s.call_id = {p}", call_id)):
            if value is not None:
                where.append(clause)
                args.append(value)
        # Only the fixed clauses above are joined; values travel as parameters.
        cond = " WHERE " + " AND ".join(where) if where else ""
        sql = f"{_WITH_META}{cond} ORDER BY s.device, s.seq"
        return self._query(sql, args)

    def delete_segments(self, keys: Iterable[tuple[str, int]]) -> None:
        raise NotImplementedError

    def segments(self, device: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM segments"
        args: tuple[Any, ...] = ()
        if device is not None:
            sql += f" WHERE device = {self.placeholder}"
            args = (device,)
        return self._query(sql + " ORDER BY device, seq", args)

    def call_segments(self, call_id: str, device: str | None = None) -> list[dict[str, Any]]:
        p = self.placeholder
        sql = f"SELECT * FROM segments WHERE call_id = {p}"  # noqa: S608 - fixed text
        args: tuple[Any, ...] = (call_id,)
        if device is not None:
            sql += f" AND device = {p}"
            args += (device,)
        return self._query(sql + " ORDER BY device, part, seq", args)

    def calls(
        self, device: str | None = None, line: str | None = None, since_ns: int | None = None
    ) -> list[CallRow]:
        p = self.placeholder
        where, args = [], []
        for clause, value in (
            (f"device = {p}", device),
            (f"line = {p}", line),
            (f"start_ns >= {p}", since_ns),
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
                start_ns=int(r["start_ns"]),
                frames=int(r["frames"]),
                rate=int(r["rate"]),
                parts=int(r["parts"]),
                complete=bool(r["complete"]),
            )
            for r in self._query(sql + " ORDER BY start_ns, device, call_id", args)
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
            if row["manifest_sha256"] != sha:
                issues.append(IndexIssue("stale", ref.device_id, ref.seq,
                                         "index row names another manifest than the store"))
            elif (row["manifest_path"], row["payload_path"]) != (
                store.location(ref.manifest_key), store.location(ref.payload_key)
            ):
                issues.append(IndexIssue("stale", ref.device_id, ref.seq,
                                         f"index row points at {row['manifest_path']}"))
        issues.extend(
            IndexIssue("orphan", dev, seq, "indexed but not in the store")
            for dev, seq in sorted(indexed)
        )
        return issues


class Index(_IndexBase):
    """The SQLite index at ``path``. Not shared between threads concurrently."""

    def __init__(self, path: Path, *, check_same_thread: bool = True,
                 locate: Callable[[str], str] = _filesystem_location) -> None:
        self.path = path
        self.where = str(path)
        self.locate = locate
        try:
            self.db = sqlite3.connect(path, timeout=30, check_same_thread=check_same_thread)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # Durability: FULL syncs the WAL at every commit: an indexed row survives a power cut.
            self.db.execute("PRAGMA synchronous=FULL")
            with self.db:
                self.db.executescript(SQLITE_SCHEMA)
        except sqlite3.Error as err:
            raise IndexDbError(
                f"{path}: cannot open the index: {err} (rebuild it: reindex)"
            ) from err

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in self.db.execute(sql, tuple(args))]
        except sqlite3.Error as err:
            raise IndexDbError(f"{self.path}: cannot read the index: {err}") from err

    def add_rows(self, rows: Iterable[dict[str, Any]], *, replace_all: bool = False,
                 meta: Iterable[dict[str, Any]] = ()) -> None:
        try:
            with self.db:
                if replace_all:
                    self.db.execute("DELETE FROM segments")
                    self.db.execute("DELETE FROM segment_meta")
                self.db.executemany(INSERT_SEGMENT, rows)
                self.db.executemany(INSERT_META, meta)
        except sqlite3.Error as err:
            raise IndexDbError(f"{self.path}: cannot write the index: {err}") from err

    def delete_segments(self, keys: Iterable[tuple[str, int]]) -> None:
        pairs = list(keys)
        try:
            with self.db:
                for table in ("segments", "segment_meta"):
                    self.db.executemany(
                        f"DELETE FROM {table} WHERE device = ? AND seq = ?",  # noqa: S608
                        pairs)
        except sqlite3.Error as err:
            raise IndexDbError(f"{self.path}: cannot write the index: {err}") from err


class PgIndex(_IndexBase):
    """The PostgreSQL index named by ``dsn``; several receivers may share it."""

    placeholder = "%s"

    def __init__(self, dsn: str, *, locate: Callable[[str], str] = _filesystem_location) -> None:
        import psycopg

        self._psycopg = psycopg
        self._dsn = dsn
        self.locate = locate
        self.where = "PostgreSQL index"
        self.db: Any = None
        self._connect()

    def _connect(self) -> None:
        """(Re)connect and make sure the schema exists."""
        from psycopg.rows import dict_row

        psycopg = self._psycopg
        try:
            self.db = psycopg.connect(self._dsn, row_factory=dict_row, connect_timeout=10,
                                      application_name="appliance-central")
            info = self.db.info
            self.where = f"PostgreSQL index {info.dbname} on {info.host}:{info.port}"
            with self.db.transaction():
                # Durability: COMMIT returns only once the WAL is flushed on the server.
                self.db.execute("SET synchronous_commit = on")
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (PG_SCHEMA_LOCK,))
                for statement in PG_SCHEMA:
                    self.db.execute(statement)
        except psycopg.Error as err:
            raise IndexDbError(f"{self.where}: cannot open the index: {_one_line(err)}") from err

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> PgIndex:
        return self

    def _alive(self) -> Any:
        """The connection; a new one when the server dropped the old (restart, failover)."""
        if self.db.closed or self.db.broken:
            self.db.close()
            self._connect()
        return self.db

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            self._alive()
            with self.db.transaction():
                return list(self.db.execute(sql, tuple(args)).fetchall())
        except self._psycopg.Error as err:
            raise IndexDbError(f"{self.where}: cannot read the index: {_one_line(err)}") from err

    def add_rows(self, rows: Iterable[dict[str, Any]], *, replace_all: bool = False,
                 meta: Iterable[dict[str, Any]] = ()) -> None:
        try:
            self._alive()
            with self.db.transaction(), self.db.cursor() as cur:
                if replace_all:
                    cur.execute("DELETE FROM segments")
                    cur.execute("DELETE FROM segment_meta")
                rows, meta = list(rows), list(meta)
                if rows:
                    cur.executemany(PG_UPSERT_SEGMENT, rows)
                if meta:
                    cur.executemany(PG_UPSERT_META, meta)
        except self._psycopg.Error as err:
            raise IndexDbError(f"{self.where}: cannot write the index: {_one_line(err)}") from err

    def delete_segments(self, keys: Iterable[tuple[str, int]]) -> None:
        pairs = list(keys)
        try:
            self._alive()
            with self.db.transaction(), self.db.cursor() as cur:
                for table in ("segments", "segment_meta"):
                    if pairs:
                        cur.executemany(
                            f"DELETE FROM {table} WHERE device = %s AND seq = %s",  # noqa: S608
                            pairs)
        except self._psycopg.Error as err:
            raise IndexDbError(f"{self.where}: cannot write the index: {_one_line(err)}") from err


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


AnyIndex = Index | PgIndex


def open_index(home: Home, *, check_same_thread: bool = True) -> AnyIndex:
    """The index configured in ``home``'s central.toml (SQLite in the home by default)."""
    cfg = index_config(home.config_path)
    locate = locator(home.config_path, home.store_dir)
    if cfg.backend == "postgresql":
        assert cfg.dsn is not None  # noqa: S101 - index_config guarantees it
        return PgIndex(cfg.dsn, locate=locate)
    return Index(home.index_path, check_same_thread=check_same_thread, locate=locate)


def rebuild_index(home: Home) -> int:
    """Recreate the index from the store alone in one transaction; returns the segment count.

    Every segment is re-verified against its enrolled key, so the status column is fresh.
    A SQLite file that cannot be opened at all is moved aside (it is derived data) and replaced.
    """
    store = Store(home)
    identity = home.identity()
    rows, meta = [], []
    for ref in store.iter_refs():
        seg = store.load_ref(ref)
        rows.append(segment_row(seg, ref, segment_status(home, seg), store.location))
        meta.append(meta_row(seg, identity))
    try:
        index = open_index(home)
    except IndexDbError:
        if index_config(home.config_path).backend != "sqlite" or not home.index_path.exists():
            raise
        aside = home.index_path.with_name(f"index.sqlite.corrupt-{int(time.time())}")
        home.index_path.rename(aside)
        for suffix in ("-wal", "-shm"):
            extra = home.index_path.with_name(home.index_path.name + suffix)
            if extra.exists():
                extra.rename(aside.with_name(aside.name + suffix))
        index = open_index(home)
    with index:
        index.add_rows(rows, replace_all=True, meta=meta)
    return len(rows)
