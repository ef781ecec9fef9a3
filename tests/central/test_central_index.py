"""The index: what the receiver writes live equals a rebuild from the store; check() finds drift."""

from __future__ import annotations

import sqlite3

from central.home import Home
from central.index import Index, rebuild_index
from central.receiver import SegmentIntake
from central.store import Store
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire

from .central_helpers import Box, known_signal


def receive_all(home: Home, segs) -> SegmentIntake:
    receiver = SegmentIntake(home)
    for seg in segs:
        outcome = receiver.handle(segment_topic(seg.device_id, seg.seq), encode_wire(seg))
        assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
    assert receiver.index is not None
    receiver.index.close()
    return receiver


def dump(home: Home) -> list[tuple]:
    db = sqlite3.connect(home.index_path)
    try:
        segs = db.execute("SELECT * FROM segments ORDER BY device, seq").fetchall()
        calls = db.execute("SELECT * FROM calls ORDER BY device, call_id").fetchall()
    finally:
        db.close()
    return segs + [("call", *c) for c in calls]


def test_rebuild_equals_live_index(home: Home, box: Box, make_box) -> None:
    other = make_box("box-2")
    segs = box.seal_call("c1", known_signal(3000), 3) + other.seal_call("c9", known_signal(900), 1)
    segs += box.seal_call("c2", known_signal(500, seed=5), 1, line="line-2")
    receive_all(home, segs)
    live = dump(home)
    assert len([r for r in live if r[0] != "call"]) == 5
    home.index_path.unlink()
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (home.root / extra).unlink(missing_ok=True)
    assert rebuild_index(home) == 5
    assert dump(home) == live


def test_calls_view_marks_incomplete_calls(home: Home, box: Box) -> None:
    parts = box.seal_call("c1", known_signal(3000), 3)
    receive_all(home, [parts[0], parts[2]])  # part 1 not (yet) arrived
    with Index(home.index_path) as index:
        (call,) = index.calls()
        assert (call.call_id, call.parts, call.complete) == ("c1", 2, False)
    receive_all(home, [parts[1]])
    with Index(home.index_path) as index:
        (call,) = index.calls()
        assert (call.parts, call.complete, call.frames) == (3, True, 3000)
        assert abs(call.duration_s - 3000 / 8000) < 1e-9
        assert index.calls(line="line-2") == [] and index.calls(device="box-1") == [call]


def test_check_reports_missing_and_orphan_rows(home: Home, box: Box) -> None:
    segs = box.seal_call("c1", known_signal(2000), 2)
    receive_all(home, segs[:1])
    Store(home).put(segs[1])  # stored, crash before indexing
    with Index(home.index_path) as index:
        issues = index.check(Store(home))
        assert [(i.kind, i.seq) for i in issues] == [("missing", 1)]
        index.db.execute("UPDATE segments SET device = 'ghost' WHERE seq = 0")
        index.db.commit()
        kinds = sorted((i.kind, i.device) for i in index.check(Store(home)))
        assert kinds == [("missing", "box-1"), ("missing", "box-1"), ("orphan", "ghost")]
    rebuild_index(home)
    with Index(home.index_path) as index:
        assert index.check(Store(home)) == []


def test_rebuild_marks_segments_whose_key_is_not_enrolled(home: Home, box: Box) -> None:
    segs = box.seal_call("c1", known_signal(800), 1)
    receive_all(home, segs)
    (home.devices_dir / "box-1.json").unlink()
    rebuild_index(home)
    with Index(home.index_path) as index:
        (row,) = index.segments()
        assert row["status"] == "unknown device"
        (call,) = index.calls()
        assert not call.complete
