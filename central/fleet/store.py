"""The fleet store: what the boxes reported, kept in ``<home>/fleet/fleet.sqlite``.

One row per box for its last status, last telemetry and config state; a bounded history of
events and command results per box. Written by the fleet service (one MQTT message at a time)
and by the command tools; read by ``appliance-central fleet ls|show|events``.

Birth and death follow Sparkplug: an ``offline`` status is recorded only when its boot id and
session match the last ``online`` one, so a late last will from an earlier connection (or an
earlier boot) never marks a box that is back online as offline.

Liveness: a box whose birth declares its keep-alive K (``keepalive_s``) sends a message at
least every K/4; :meth:`FleetStore.mark_silent` (the fleet service's sweep) records it offline,
reason ``silent``, once nothing arrived from it for K/2, so a box that falls silent without
closing its connection shows offline within its keep-alive, before the broker's will (1.5 K).
Any later message of the same connection brings it back online; the will of that connection,
when it comes, keeps the time the box was first recorded offline. A box that disconnects is
recorded offline by its last will (reason ``will``) the moment the broker publishes it.

Bounded against a misbehaving box: each message is at most 64 KiB (checked before it gets here),
and at most :data:`MAX_EVENTS_PER_BOX` events and :data:`MAX_RESULTS_PER_BOX` results are kept per
box (oldest dropped), so no box can fill central's disk.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from linerec_contract.errors import StateDirError
from linerec_contract.fleet_protocol import SILENCE_FRACTION

MAX_EVENTS_PER_BOX = 1000
MAX_RESULTS_PER_BOX = 200
LIVENESS_COLUMNS = (("keepalive_s", "INTEGER"), ("last_seen", "REAL"), ("offline_at", "REAL"),
                    ("offline_reason", "TEXT"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS status (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, version TEXT, boot_id TEXT, session INTEGER,
    config_version INTEGER, ts REAL, received_at REAL NOT NULL, online_since REAL,
    keepalive_s INTEGER, last_seen REAL, offline_at REAL, offline_reason TEXT);
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT PRIMARY KEY, payload TEXT NOT NULL, ts REAL, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, kind TEXT NOT NULL, ts REAL,
    payload TEXT NOT NULL, received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_device ON events (device, id);
CREATE TABLE IF NOT EXISTS results (
    nonce TEXT PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL, result TEXT NOT NULL,
    code TEXT, reason TEXT, payload TEXT NOT NULL, received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS results_device ON results (device, received_at);
CREATE TABLE IF NOT EXISTS config (
    device TEXT PRIMARY KEY, desired_version INTEGER NOT NULL DEFAULT 0, desired TEXT,
    desired_at REAL, reported TEXT, reported_at REAL);
"""


class FleetStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # Durability: WAL with synchronous=NORMAL keeps the store consistent across a power
            # cut but may lose the last commits before it. That is enough for this store: it is
            # a view of soft state (retained statuses, periodic telemetry) that the boxes send
            # again, and it lets one central keep up with hundreds of boxes without an fsync
            # per message. Enrolment, keys and the CRL are files, fsynced (registry.py).
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(status)")}
            for column, kind in LIVENESS_COLUMNS:  # a store made before liveness existed
                if column not in have:
                    self.db.execute(f"ALTER TABLE status ADD COLUMN {column} {kind}")
        except (OSError, sqlite3.Error) as err:
            raise StateDirError(f"fleet store {path} cannot be opened: {err}") from err
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writers ---------------------------------------------------------------------------

    def record_status(self, dev: str, status: dict[str, Any]) -> bool:
        """Record a birth or death; False when a death was ignored (stale boot id or session)."""
        now = time.time()
        row = self.db.execute("SELECT * FROM status WHERE device = ?", (dev,)).fetchone()
        state = status["state"]
        same = row is not None and row["boot_id"] == status["boot_id"] and \
            row["session"] == status["session"]
        if state == "offline" and row is not None and row["state"] == "online" and not same:
            return False
        online_since = now if state == "online" else None
        if state == "online" and row is not None and row["state"] == "online" and same:
            online_since = row["online_since"]
        offline_at, reason = (None, None) if state == "online" else (now, "will")
        if state == "offline" and row is not None and row["state"] == "offline" and same and \
                row["offline_at"] is not None:
            offline_at = row["offline_at"]  # silent first: the box was offline since then
        keepalive = status.get("keepalive_s") or (row["keepalive_s"] if same and row else None)
        self.db.execute(
            "INSERT OR REPLACE INTO status (device, state, version, boot_id, session, "
            "config_version, ts, received_at, online_since, keepalive_s, last_seen, offline_at, "
            "offline_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dev, state, status.get("version"), status.get("boot_id"), status.get("session"),
             status.get("config_version"), status.get("ts"), now, online_since, keepalive,
             now if state == "online" else (row["last_seen"] if row else None), offline_at,
             reason))
        return True

    def touch(self, dev: str, now: float | None = None) -> bool:
        """A message from ``dev`` arrived: it is alive. True when this brought back a box that
        was recorded offline for silence (same connection: its will has not come)."""
        now = time.time() if now is None else now
        cur = self.db.execute(
            "UPDATE status SET state = 'online', offline_at = NULL, offline_reason = NULL, "
            "last_seen = ? WHERE device = ? AND state = 'offline' AND offline_reason = 'silent'",
            (now, dev))
        if cur.rowcount:
            return True
        self.db.execute("UPDATE status SET last_seen = ? WHERE device = ? AND state = 'online'",
                        (now, dev))
        return False

    def mark_silent(self, now: float | None = None, since: float = 0.0) -> list[str]:
        """Record offline (reason ``silent``) every online box that declared a keep-alive and
        sent nothing for :data:`SILENCE_FRACTION` of it; return their device ids. ``since``:
        when central's own subscription began (silence is counted from then at the earliest,
        so central's own outage never shows the fleet offline)."""
        now = time.time() if now is None else now
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            rows = self.db.execute(
                "SELECT device FROM status WHERE state = 'online' AND keepalive_s > 0 AND "
                "MAX(COALESCE(last_seen, 0), ?) < ? - keepalive_s * ?",
                (since, now, SILENCE_FRACTION)).fetchall()
            devices = [r[0] for r in rows]
            self.db.executemany(
                "UPDATE status SET state = 'offline', offline_at = ?, offline_reason = 'silent' "
                "WHERE device = ?", [(now, d) for d in devices])
        return devices

    def record_telemetry(self, dev: str, telemetry: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO telemetry VALUES (?, ?, ?, ?)",
                        (dev, json.dumps(telemetry), telemetry.get("ts"), time.time()))

    def record_event(self, dev: str, event: dict[str, Any]) -> None:
        kind = str(event.get("kind", "?"))[:64]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO events (device, kind, ts, payload, received_at) VALUES (?, ?, ?, ?, ?)",
                (dev, kind, event.get("ts"), json.dumps(event), time.time()))
            self.db.execute(
                "DELETE FROM events WHERE device = ? AND id <= (SELECT id FROM events WHERE "
                "device = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (dev, dev, MAX_EVENTS_PER_BOX))

    def record_result(self, dev: str, result: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (str(result.get("nonce")), dev, str(result.get("name")), str(result.get("result")),
                 str(result.get("code", "")), str(result.get("reason", "")), json.dumps(result),
                 time.time()))
            self.db.execute(
                "DELETE FROM results WHERE device = ? AND received_at < (SELECT received_at FROM "
                "results WHERE device = ? ORDER BY received_at DESC LIMIT 1 OFFSET ?)",
                (dev, dev, MAX_RESULTS_PER_BOX))

    def set_desired(self, dev: str, overrides: dict[str, Any]) -> int:
        """Store a new desired config for ``dev`` and return its version (one more than before)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT desired_version FROM config WHERE device = ?",
                                  (dev,)).fetchone()
            version = (row["desired_version"] if row else 0) + 1
            self.db.execute(
                "INSERT INTO config (device, desired_version, desired, desired_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET "
                "desired_version = excluded.desired_version, desired = excluded.desired, "
                "desired_at = excluded.desired_at",
                (dev, version, json.dumps(overrides), time.time()))
        return version

    def record_reported(self, dev: str, reported: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO config (device, reported, reported_at) VALUES (?, ?, ?) "
            "ON CONFLICT(device) DO UPDATE SET reported = excluded.reported, "
            "reported_at = excluded.reported_at", (dev, json.dumps(reported), time.time()))

    # -- readers ---------------------------------------------------------------------------

    def status(self, dev: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM status WHERE device = ?", (dev,)).fetchone()
        return dict(row) if row else None

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {r["device"]: dict(r) for r in self.db.execute("SELECT * FROM status")}

    def telemetry(self, dev: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM telemetry WHERE device = ?", (dev,)).fetchone()
        if row is None:
            return None
        out: dict[str, Any] = json.loads(row["payload"])
        out["received_at"] = row["received_at"]
        return out

    def telemetries(self) -> dict[str, dict[str, Any]]:
        out = {}
        for row in self.db.execute("SELECT * FROM telemetry"):
            item = json.loads(row["payload"])
            item["received_at"] = row["received_at"]
            out[row["device"]] = item
        return out

    def events(self, dev: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = "SELECT * FROM events"
        args: tuple[Any, ...] = ()
        if dev is not None:
            query += " WHERE device = ?"
            args = (dev,)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"device": r["device"], "kind": r["kind"], "ts": r["ts"],
                 "received_at": r["received_at"], **json.loads(r["payload"])}
                for r in reversed(rows)]

    def result(self, nonce: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT payload FROM results WHERE nonce = ?", (nonce,)).fetchone()
        return json.loads(row["payload"]) if row else None

    def config(self, dev: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM config WHERE device = ?", (dev,)).fetchone()
        if row is None:
            return {"desired_version": 0, "desired": {}, "reported": None}
        return {"desired_version": row["desired_version"],
                "desired": json.loads(row["desired"]) if row["desired"] else {},
                "desired_at": row["desired_at"],
                "reported": json.loads(row["reported"]) if row["reported"] else None,
                "reported_at": row["reported_at"]}
