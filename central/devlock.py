"""The device lock across machines: a PostgreSQL advisory lock per device.

Receivers on several machines (each with its own home) that share one broker, one bucket and
one PostgreSQL index must still run the chain check, the store and the rotation record of one
device as one critical section. The local ``flock`` of :meth:`central.store.Store.device_lock`
holds only within one home; with the PostgreSQL index the store also takes
``pg_advisory_lock(DEVICE_LOCK_CLASS, <32-bit hash of the device id>)`` on a connection of its
own, and releases it (``pg_advisory_unlock``) when the section ends. The two-key form keeps
these locks apart from the single-key schema lock of :mod:`central.index`; two devices whose
hashes collide merely wait for each other.

A session lock dies with its connection: should the connection to the server drop while a
section runs, the other machines may enter. The objects stay safe (the store writes each
object once, conditionally, and refuses a second writer), but the section is reported
(``StoreError``) so that nothing is acknowledged on a lock that was lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import Any

from linerec_contract.errors import ApplianceError

DEVICE_LOCK_CLASS = 0x6C726563  # "lrec": the namespace of the per-device locks
_IDLE_CONNECTIONS = 4


class DeviceLockError(ApplianceError):
    """The PostgreSQL device lock could not be taken, or was lost while held."""


def device_lock_key(dev: str) -> int:
    """The signed 32-bit second key of ``dev``'s advisory lock (first 4 bytes of SHA-256)."""
    return int.from_bytes(hashlib.sha256(dev.encode()).digest()[:4], "big", signed=True)


class PgDeviceLocks:
    """Per-device advisory locks on the PostgreSQL server named by ``dsn``.

    Each held lock has a connection of its own (idle ones are kept for reuse), so a thread
    waiting for one device never blocks another thread working on another device.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._idle: list[Any] = []
        self._mutex = threading.Lock()

    def _connection(self) -> Any:
        import psycopg

        with self._mutex:
            while self._idle:
                conn = self._idle.pop()
                if not (conn.closed or conn.broken):
                    return conn
                conn.close()
        try:
            return psycopg.connect(self._dsn, autocommit=True, connect_timeout=10,
                                   application_name="appliance-central device lock")
        except psycopg.Error as err:
            raise DeviceLockError(f"cannot reach PostgreSQL for the device lock: "
                                  f"{_one_line(err)}") from err

    def _give_back(self, conn: Any) -> None:
        with self._mutex:
            if len(self._idle) < _IDLE_CONNECTIONS and not (conn.closed or conn.broken):
                self._idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def hold(self, dev: str) -> Iterator[None]:
        """Wait for and hold ``dev``'s advisory lock for the duration of the block."""
        import psycopg

        key = (DEVICE_LOCK_CLASS, device_lock_key(dev))
        conn = self._connection()
        try:
            conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
        except psycopg.Error as err:
            conn.close()
            raise DeviceLockError(f"cannot take the PostgreSQL lock of device {dev}: "
                                  f"{_one_line(err)}") from err
        ok = False
        try:
            yield
            ok = True
        finally:
            try:
                row = conn.execute("SELECT pg_advisory_unlock(%s, %s)", key).fetchone()
                held = bool(row and row[0])
            except psycopg.Error:
                held = False
            if held:
                self._give_back(conn)
            else:
                conn.close()
            if ok and not held:
                raise DeviceLockError(f"the PostgreSQL lock of device {dev} was lost while "
                                      "held (connection dropped); the message stays unanswered")

    def close(self) -> None:
        with self._mutex:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
