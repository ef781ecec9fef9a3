"""The fleet store: what the boxes reported, kept in ``<home>/fleet/fleet.sqlite``.

One row per box for its last status, last telemetry and config state; a bounded history of
events and command results per box. Written by the fleet service (one MQTT message at a time)
and by the command tools; read by ``appliance-central fleet ls|show|events``.

Birth and death follow Sparkplug: an ``offline`` status is recorded only when its boot id and
session match the last ``online`` one, so a late last will from an earlier connection (or an
earlier boot) never marks a box that is back online as offline.

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

MAX_EVENTS_PER_BOX = 1000
MAX_RESULTS_PER_BOX = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS status (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, version TEXT, boot_id TEXT, session INTEGER,
    config_version INTEGER, ts REAL, received_at REAL NOT NULL, online_since REAL);
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
        if state == "offline" and row is not None and row["state"] == "online" and (
                row["boot_id"] != status["boot_id"] or row["session"] != status["session"]):
            return False
        online_since = now if state == "online" else None
        if state == "online" and row is not None and row["state"] == "online" and \
                row["boot_id"] == status["boot_id"] and row["session"] == status["session"]:
            online_since = row["online_since"]
        self.db.execute(
            "INSERT OR REPLACE INTO status VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dev, state, status.get("version"), status.get("boot_id"), status.get("session"),
             status.get("config_version"), status.get("ts"), now, online_since))
        return True

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
