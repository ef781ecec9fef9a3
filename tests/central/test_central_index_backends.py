"""Index backends: locations relative to the home, ``reindex`` from the store alone, and the
same index on SQLite and on PostgreSQL (a private server from Debian's postgresql-15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from central.cli import main
from central.home import Home, init_home
from central.index import PgIndex, open_index
from central.receiver import SegmentIntake
from central.store import Store
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import SealedSegment, encode_wire

from .central_helpers import DEVICE, Box, known_signal


def receive(home: Home, segs: list[SealedSegment]) -> None:
    intake = SegmentIntake(home)
    try:
        for seg in segs:
            outcome = intake.handle(segment_topic(seg.device_id, seg.seq), encode_wire(seg))
            assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
    finally:
        intake.close()


def dump(home: Home) -> tuple[list[dict[str, Any]], list[Any]]:
    with open_index(home) as index:
        return index.segments(), index.calls()


def sample(home: Home, box: Box, make_box: Any) -> list[SealedSegment]:
    other = make_box("box-2")
    segs = box.seal_call("c1", known_signal(3000), 3)
    segs += other.seal_call("c9", known_signal(900, seed=3), 1)
    segs += box.seal_call("c2", known_signal(500, seed=5), 2, line="line-2",
                          start_ns=1_800_000_000_000_000_000)
    return segs


def cli(home: Path, *args: str) -> int:
    return main(["--home", str(home), *args])


def test_copied_home_verifies_clean_and_reindex_gives_the_same_index(
        home: Home, box: Box, make_box: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receive(home, sample(home, box, make_box))
    live = dump(home)
    assert len(live[0]) == 6 and len(live[1]) == 3
    for row in live[0]:
        assert row["manifest_path"] == f"store/{row['device']}/{row['seq']:012d}.manifest.json"
        assert (home.root / row["payload_path"]).is_file()

    copy = tmp_path / "restored" / "central"
    shutil.copytree(home.root, copy)
    shutil.rmtree(home.root)  # the original is gone: nothing may still point into it
    capsys.readouterr()
    assert cli(copy, "verify") == 0
    out = capsys.readouterr().out
    assert "WARN" not in out and "OK: 6 segment(s) from 2 device(s)" in out, out

    copied = Home(copy)
    (copy / "index.sqlite").unlink()
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (copy / extra).unlink(missing_ok=True)
    assert cli(copy, "reindex") == 0
    assert "6 segment(s)" in capsys.readouterr().out
    assert dump(copied) == live

    assert cli(copy, "export", "--reason", "audit check", "c1", "--out", str(tmp_path / "c1.wav")) == 0


def test_files_in_the_store_are_read_only_and_never_replaced(home: Home, box: Box) -> None:
    segs = box.seal_call("c1", known_signal(800), 1)
    receive(home, segs)
    for path in (home.store_dir / "box-1").iterdir():
        if not path.name.startswith("."):
            assert path.stat().st_mode & 0o777 == 0o444, path


def use_postgresql(home: Home, dsn: str) -> None:
    home.config_path.write_text(f'[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n')


def test_postgresql_index_equals_sqlite_and_reindex(
        tmp_path: Path, box_key: Any, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from linerec_contract.identity import DeviceKey

    # The same segments into two homes: one with the embedded SQLite index, one with PostgreSQL.
    lite, pg = init_home(tmp_path / "lite"), init_home(tmp_path / "pg")
    use_postgresql(pg, pg_dsn)
    key2 = DeviceKey.generate()
    for h in (lite, pg):
        h.enroll("box-1", box_key.public_b64)
        h.enroll("box-2", key2.public_b64)
    recipients = lite.recipients() + pg.recipients()
    one, two = Box("box-1", box_key, recipients), Box("box-2", key2, recipients)
    segs = one.seal_call("c1", known_signal(3000), 3) + two.seal_call("c9", known_signal(900), 1)
    segs += one.seal_call("c2", known_signal(700, seed=2), 2, line="line-2")
    receive(lite, segs[:-1])  # the last part missing: one incomplete call
    receive(pg, segs[:-1])
    with open_index(pg) as index:
        assert isinstance(index, PgIndex)
    assert dump(pg) == dump(lite)
    calls = {c.call_id: c.complete for c in dump(pg)[1]}
    assert calls == {"c1": True, "c9": True, "c2": False}

    live = dump(pg)
    with open_index(pg) as index:  # damage the index: it is derived data
        index.db.execute("DELETE FROM segments WHERE seq = 1")
        index.db.execute("UPDATE segments SET status = 'x' WHERE seq = 0")
        index.db.commit()
    capsys.readouterr()
    assert cli(pg.root, "verify") == 0
    assert "WARN index missing: box-1/1" in capsys.readouterr().out
    assert cli(pg.root, "reindex") == 0
    assert dump(pg) == live
    capsys.readouterr()
    assert cli(pg.root, "verify", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["index_issues"] == [] and report["segments"] == 5


def test_bad_index_and_storage_settings_exit_2_with_one_line(
        home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        '[index]\nbackend = "mysql"\n': "index.backend = 'mysql' is not accepted",
        '[index]\nbackend = "postgresql"\n': "index.dsn is required",
        '[storage]\nbackend = "s3"\n': "storage.bucket is required",
        '[storage]\nbackend = "filesystem"\nbucket = "x"\n': "storage.bucket applies only",
        '[storage]\nbackend = "s3"\nbucket = "b"\nretention_days = 0\n': "retention_days must",
        '[storage]\nbogus = 1\n': "unknown key storage.bogus",
        '[index]\nbackend = "postgresql"\ndsn = "host=127.0.0.1 port=1 connect_timeout=2"\n':
            "cannot open the index",
    }
    for text, expect in cases.items():
        home.config_path.write_text(text)
        capsys.readouterr()
        assert cli(home.root, "calls") == 2, text
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expect in err, (text, err)


def test_postgresql_index_reconnects_after_the_server_dropped_it(
        home: Home, box: Box, pg_dsn: str) -> None:
    import psycopg

    from central.index import IndexDbError

    use_postgresql(home, pg_dsn)
    segs = box.seal_call("c1", known_signal(1600), 2)
    intake = SegmentIntake(home)
    try:
        first = intake.handle(segment_topic(DEVICE, 0), encode_wire(segs[0]))
        assert first.ack is not None and first.ack.result == "stored"
        with psycopg.connect(pg_dsn, autocommit=True) as admin:  # a server restart, a failover
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'appliance-central'").fetchall()
        assert killed == [(True,)]
        # The receiver learns it on the next write: no ack (the broker keeps the message)...
        with pytest.raises(IndexDbError):
            intake.handle(segment_topic(DEVICE, 1), encode_wire(segs[1]))
        # ...and the redelivery, on a new connection, completes the index.
        again = intake.handle(segment_topic(DEVICE, 1), encode_wire(segs[1]))
        assert again.ack is not None and again.ack.result == "duplicate"
    finally:
        intake.close()
    with open_index(home) as index:
        assert [r["seq"] for r in index.segments()] == [0, 1]
        assert index.check(Store(home)) == []
