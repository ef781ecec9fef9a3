"""A private PostgreSQL server from Debian's postgresql-15 package, for the index tests.

Started once per test session in a temporary folder on a free loopback port (trust
authentication on 127.0.0.1 only); each test gets a database of its own. initdb refuses to run
as root, so under root the server runs as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).is_file():
                pytest.skip(f"{PG_BIN / tool} is missing: apt-get install postgresql-15 "
                            "(scripts/bootstrap.sh does)")
        self.run_as: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="central-pg-"))
        if os.getuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.port = _free_port()
        self._run([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                   "--no-sync", "-E", "UTF8"])
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.root} -c max_connections=60")
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                   "-o", opts, "-w", "-t", "60", "start"])

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run([*self.run_as, *argv], capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {done.stderr}{done.stdout}{log[-2000:]}")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                       "stop"])
        for _ in range(50):
            if not (self.data / "postmaster.pid").exists():
                break
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def pg_dsn(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's private PostgreSQL server."""
    return pg_server.new_database()
