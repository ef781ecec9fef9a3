"""The device lock across machines: receivers with homes of their own sharing one PostgreSQL
index run the chain check and store of one device one at a time (a private server from Debian's
postgresql-15; each home stands for one machine: its flock files are not shared)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from central.devlock import DEVICE_LOCK_CLASS, device_lock_key
from central.home import Home, init_home
from central.store import Store, StoreError
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire

from .central_helpers import Box, known_signal


def _machine(root: Path, dsn: str, box_key: Any) -> Home:
    home = init_home(root)
    home.config_path.write_text(f'[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
    home.enroll("box-1", box_key.public_b64)
    return home


def _intake_process(home: Home, topic: str, blob: Path) -> subprocess.Popen[str]:
    script = (
        "from pathlib import Path\n"
        "from central.home import open_home\nfrom central.receiver import SegmentIntake\n"
        f"out = SegmentIntake(open_home(Path({str(home.root)!r}))).handle("
        f"{topic!r}, Path({str(blob)!r}).read_bytes())\n"
        "print(out.ack.result)\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def _lock_waiters(dsn: str, dev: str) -> int:
    """Sessions waiting (not granted) for ``dev``'s advisory lock, as the server sees them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 2",
            (DEVICE_LOCK_CLASS, device_lock_key(dev) & 0xFFFFFFFF)).fetchone()
    return int(row[0]) if row else 0


def test_a_receiver_on_another_machine_waits_for_the_device_lock(
        tmp_path: Path, box_key: Any, pg_dsn: str) -> None:
    first = _machine(tmp_path / "machine-a", pg_dsn, box_key)
    second = _machine(tmp_path / "machine-b", pg_dsn, box_key)
    seg = Box("box-1", box_key, second.recipients()).seal_call("c1", known_signal(800), 1)[0]
    blob = tmp_path / "seg.bin"
    blob.write_bytes(encode_wire(seg))
    holder, theirs = Store(first), Store(second)

    # Another device's lock on machine A does not hold box-1 on machine B.
    with holder.device_lock("box-2"):
        proc = _intake_process(second, segment_topic("box-1", 0), blob)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.strip() == "stored"
    theirs_seq1 = Box("box-1", box_key, second.recipients())
    theirs_seq1.seq, theirs_seq1.prev = 1, seg.manifest_sha256
    nxt = theirs_seq1.seal_call("c2", known_signal(800, seed=2), 1)[0]
    blob.write_bytes(encode_wire(nxt))

    # Box-1's lock held on machine A: machine B's receiver (its own home, its own flock) waits.
    with holder.device_lock("box-1"):
        proc = _intake_process(second, segment_topic("box-1", 1), blob)
        waited = 0
        for _ in range(40):
            time.sleep(0.1)
            assert proc.poll() is None, "the receiver of machine B did not wait for the lock"
            assert not theirs.exists("box-1", 1)
            waited = max(waited, _lock_waiters(pg_dsn, "box-1"))
        assert waited == 1  # the server shows it queued on box-1's advisory lock
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "stored"
    assert theirs.exists("box-1", 1)
    holder.close()
    theirs.close()


def test_a_lost_device_lock_is_reported_not_acknowledged(
        tmp_path: Path, box_key: Any, pg_dsn: str) -> None:
    home = _machine(tmp_path / "machine-a", pg_dsn, box_key)
    store = Store(home)
    try:
        with store.device_lock("box-1"):
            with psycopg.connect(pg_dsn, autocommit=True) as admin:  # the connection drops
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = 'appliance-central device lock'")
    except StoreError as err:
        assert "lock of device box-1 was lost" in str(err)
    else:
        raise AssertionError("a lost device lock went unnoticed")
    with store.device_lock("box-1"):  # a new connection takes it again
        pass
    store.close()
