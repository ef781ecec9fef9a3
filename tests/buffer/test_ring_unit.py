"""Unit tests of the ring journal: format, wrap-around, gaps, bad files, cursor, check."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import linerec_contract.durable
from appliance.buffer import (
    Cursor,
    Flags,
    Gap,
    Record,
    RingError,
    RingReader,
    RingWriter,
    SampleFormat,
    buffer_check_command,
    check,
)
from appliance.buffer.check import check_live
from appliance.buffer.format import (
    BYTES_PER_SAMPLE,
    FILE_HEADER_SIZE,
    RECORD_HEADER_SIZE,
    FileHeader,
    decode_file_header,
    decode_record,
    encode_file_header,
    encode_record,
)
from linerec_contract.errors import ConfigError, FormatError

SLOT = 4096


def _open(path: Path, slots: int = 8) -> RingWriter:
    return RingWriter.open(
        path, stream_id=5, size_bytes=FILE_HEADER_SIZE + slots * SLOT, slot_size=SLOT,
        sync_interval_s=0.0,
    )


def _append(w: RingWriter, seq_tag: int, frames: int = 100, frame_pos: int | None = None,
            **kw: object) -> int:
    pos = seq_tag * frames if frame_pos is None else frame_pos
    payload = bytes([seq_tag % 256]) * (frames * 2)
    return w.append(payload, frames=frames, channels=1, rate=8000,
                    sample_format=SampleFormat.S16_LE, frame_pos=pos, **kw)  # type: ignore[arg-type]


def _drain(r: RingReader) -> list[Record | Gap]:
    out: list[Record | Gap] = []
    for _ in range(100):
        batch = r.poll(16)
        if not batch:
            return out
        out.extend(batch)
    raise AssertionError("reader never ran dry")


GEO = FileHeader(slot_size=SLOT, slot_count=8, stream_id=9, created_ns=1, first_seq=0,
                 journal_id=b"j" * 16)

records = st.builds(
    lambda seq, ch, fmt, frames, pos, mono, wall, gap, xrun, boot: Record(
        stream_id=9, seq=seq, boot_id=boot, mono_ns=mono, wall_ns=wall, frame_pos=pos,
        frames=frames, channels=ch, sample_format=fmt, rate=48000,
        flags=(Flags.GAP if gap else Flags.NONE) | (Flags.XRUN if xrun else Flags.NONE),
        gap_frames=gap, payload=b"\x01" * (frames * ch * BYTES_PER_SAMPLE[fmt]),
    ),
    st.integers(0, 2**64 - 1), st.integers(1, 4), st.sampled_from(list(SampleFormat)),
    st.integers(0, 250), st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1), st.integers(0, 10**6), st.booleans(),
    st.binary(min_size=16, max_size=16),
)


@given(records)
def test_record_roundtrip(rec: Record) -> None:
    head, body = encode_record(rec, max_payload=GEO.max_payload)
    assert len(head) == RECORD_HEADER_SIZE
    slot = rec.seq % GEO.slot_count
    assert decode_record(head + body, GEO, slot) == rec
    assert decode_record(head + body, GEO, (slot + 1) % GEO.slot_count) is None  # wrong slot


@given(records, st.integers(0, RECORD_HEADER_SIZE + 50), st.integers(1, 255))
def test_any_flipped_byte_is_rejected(rec: Record, pos: int, xor: int) -> None:
    head, body = encode_record(rec, max_payload=GEO.max_payload)
    data = bytearray(head + body)
    if pos >= len(data):
        return
    data[pos] ^= xor
    assert decode_record(bytes(data), GEO, rec.seq % GEO.slot_count) is None


def test_record_field_checks() -> None:
    base = dict(stream_id=9, seq=1, boot_id=b"b" * 16, mono_ns=0, wall_ns=0, frame_pos=0,
                frames=2, channels=1, sample_format=SampleFormat.S16_LE, rate=8000,
                flags=Flags.NONE, gap_frames=0, payload=b"abcd")
    encode_record(Record(**base), max_payload=100)  # type: ignore[arg-type]
    bad = [
        {"payload": b"abc"},  # not frames*channels*2
        {"gap_frames": 3},  # gap frames without GAP
        {"channels": 0},
        {"boot_id": b"short"},
        {"seq": -1},
        {"payload": b"x" * 200, "frames": 100},
    ]
    for change in bad:
        with pytest.raises(FormatError):
            encode_record(Record(**{**base, **change}), max_payload=100)  # type: ignore[arg-type]


def test_file_header_roundtrip_and_rejects() -> None:
    block = encode_file_header(GEO)
    assert len(block) == FILE_HEADER_SIZE
    assert decode_file_header(block, "x") == GEO
    with pytest.raises(FormatError, match="CRC"):
        decode_file_header(block[:20] + b"\xff" + block[21:], "x")
    with pytest.raises(FormatError, match="magic"):
        decode_file_header(b"garbage!" + block[8:], "x")
    with pytest.raises(FormatError, match="truncated"):
        decode_file_header(block[:30], "x")


def test_append_read_and_wraparound(tmp_path: Path) -> None:
    p = tmp_path / "s.ring"
    w = _open(p, slots=8)
    assert w.max_payload == SLOT - RECORD_HEADER_SIZE
    for i in range(30):
        assert _append(w, i) == i
    r = RingReader(p)
    assert (r.oldest_seq(), r.newest_seq(), r.next_seq) == (22, 29, 22)
    got = _drain(r)
    assert [x.seq for x in got if isinstance(x, Record)] == list(range(22, 30))
    assert all(isinstance(x, Record) for x in got)
    rec = r.get(25)
    assert rec is not None and rec.payload == bytes([25]) * 200 and rec.frame_pos == 2500
    assert r.get(21) is None and r.get(30) is None
    assert r.poll() == []
    _append(w, 30)
    assert [x.seq for x in r.poll() if isinstance(x, Record)] == [30]
    w.close()
    w2 = _open(p, slots=8)
    assert w2.next_seq == 31 and w2.recovery_note is None and w2.boot_id != w.boot_id
    w2.close()


def test_payload_too_large_raises(tmp_path: Path) -> None:
    w = _open(tmp_path / "s.ring")
    with pytest.raises(FormatError, match="at most"):
        w.append(b"\0" * (w.max_payload + 2), frames=(w.max_payload + 2) // 2, channels=1,
                 rate=8000, sample_format=SampleFormat.S16_LE, frame_pos=0)
    assert w.next_seq == 0


def test_bad_geometry_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="slot_size"):
        RingWriter.open(tmp_path / "a", stream_id=1, size_bytes=10**6, slot_size=5000)
    with pytest.raises(ConfigError, match="size_bytes"):
        RingWriter.open(tmp_path / "a", stream_id=1, size_bytes=8192, slot_size=4096)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    w = _open(tmp_path / "s.ring")
    with pytest.raises(RingError, match="lock"):
        _open(tmp_path / "s.ring")
    w.close()


def test_lapped_reader_gets_exact_overrun_gap(tmp_path: Path) -> None:
    p = tmp_path / "s.ring"
    w = _open(p, slots=8)
    for i in range(4):
        _append(w, i)
    r = RingReader(p)
    assert len(_drain(r)) == 4  # read 0..3, now at 4
    for i in range(4, 20):
        _append(w, i, flags=Flags.GAP if i == 14 else Flags.NONE, gap_frames=7 if i == 14 else 0,
                frame_pos=i * 100 + (7 if i >= 14 else 0))
    got = _drain(r)
    assert got[0] == Gap(first_seq=4, last_seq=11, frames=800, reason="overrun")
    assert [x.seq for x in got[1:] if isinstance(x, Record)] == list(range(12, 20))
    # A lapped reader that lost the GAP record too counts its lost frames in the Gap.
    r.seek(20)
    for i in range(20, 23):
        _append(w, i, frame_pos=i * 100 + 7)
    assert [x.seq for x in r.poll() if isinstance(x, Record)] == [20, 21, 22]
    for i in range(23, 40):
        _append(w, i, frame_pos=i * 100 + 7 + (50 if i >= 30 else 0),
                flags=Flags.GAP if i == 30 else Flags.NONE, gap_frames=50 if i == 30 else 0)
    got = _drain(r)
    assert got[0] == Gap(first_seq=23, last_seq=31, frames=9 * 100 + 50, reason="overrun")


def _corrupt_slot(path: Path, slot: int, at: int = RECORD_HEADER_SIZE + 10) -> None:
    with path.open("r+b") as f:
        f.seek(FILE_HEADER_SIZE + slot * SLOT + at)
        b = f.read(1)
        f.seek(FILE_HEADER_SIZE + slot * SLOT + at)
        f.write(bytes([b[0] ^ 0x55]))


def test_corrupt_middle_slot_becomes_corrupt_gap(tmp_path: Path) -> None:
    p = tmp_path / "s.ring"
    w = _open(p, slots=8)
    for i in range(6):
        _append(w, i)
    _corrupt_slot(p, 2)
    _corrupt_slot(p, 3, at=5)  # header damage too
    r = RingReader(p)
    got = _drain(r)
    assert got[2] == Gap(first_seq=2, last_seq=3, frames=200, reason="corrupt")
    assert [x.seq for x in got if isinstance(x, Record)] == [0, 1, 4, 5]
    assert r.get(2) is None
    rep = check(p)
    assert rep.corrupt_slots == [2, 3] and rep.gaps == [(2, 3)] and not rep.ok


def test_torn_tail_is_not_reported_as_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "s.ring"
    w = _open(p, slots=8)
    for i in range(3):
        _append(w, i)
    r = RingReader(p)
    assert len(_drain(r)) == 3
    # Simulate the writer in the middle of writing seq 3: header there, payload not yet.
    head, _ = encode_record(
        Record(stream_id=5, seq=3, boot_id=w.boot_id, mono_ns=0, wall_ns=0, frame_pos=300,
               frames=100, channels=1, sample_format=SampleFormat.S16_LE, rate=8000,
               flags=Flags.NONE, gap_frames=0, payload=b"\x07" * 200),
        max_payload=w.max_payload,
    )
    with p.open("r+b") as f:
        f.seek(FILE_HEADER_SIZE + 3 * SLOT)
        f.write(head)
    assert r.poll() == [] and r.next_seq == 3
    # The writer finishes it: now it reads fine.
    _append(w, 3)
    assert [x.seq for x in r.poll() if isinstance(x, Record)] == [3]


def test_recovery_after_unclean_stop_discards_torn_tail(tmp_path: Path) -> None:
    p = tmp_path / "s.ring"
    w = _open(p, slots=16)
    for i in range(20):
        _append(w, i)
    w.sync()
    os.close(w._fd)  # type: ignore[arg-type]  # crash: no close()
    _corrupt_slot(p, 19 % 16)
    w2 = _open(p, slots=16)
    assert w2.next_seq == 19  # the torn record's seq was never valid, so it is reused
    w2.close()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("version", "version 2, expected 1"),
        ("truncate", "truncated"),
        ("garbage", "not a ring journal"),
        ("empty", "truncated"),
        ("geometry", "geometry"),
    ],
)
def test_bad_file_moved_aside_and_fresh_journal(
    tmp_path: Path, damage: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    p = tmp_path / "s.ring"
    w = _open(p, slots=8)
    for i in range(5):
        _append(w, i)
    w.close()
    original = p.read_bytes()
    if damage == "version":
        hdr = decode_file_header(original, "x")
        block = bytearray(encode_file_header(FileHeader(**{**hdr.__dict__, "version": 2})))
        p.write_bytes(bytes(block) + original[FILE_HEADER_SIZE:])
    elif damage == "truncate":
        p.write_bytes(original[: FILE_HEADER_SIZE + 3 * SLOT])
    elif damage == "garbage":
        p.write_bytes(os.urandom(len(original)))
    elif damage == "empty":
        p.write_bytes(b"")
    damaged = p.read_bytes()
    with caplog.at_level(logging.WARNING, logger="appliance.buffer"):
        w2 = _open(p, slots=16 if damage == "geometry" else 8)
    assert w2.recovery_note is not None and reason in w2.recovery_note
    assert str(p) in w2.recovery_note and "\n" not in w2.recovery_note
    assert any("moved aside" in m for m in caplog.messages)
    aside = [x for x in tmp_path.iterdir() if x.name.startswith("s.ring.bad-")]
    assert len(aside) == 1 and aside[0].read_bytes() == (original if damage == "geometry" else damaged)
    # A geometry change keeps the sequence going; unreadable files start again at 0.
    assert w2.next_seq == (5 if damage == "geometry" else 0)
    _append(w2, 1)
    w2.close()
    assert check(p).ok and check(p).records == 1


def test_cursor_roundtrip_and_damage(tmp_path: Path) -> None:
    c = Cursor(tmp_path / "cur")
    assert c.load() is None
    c.save(12345)
    assert c.load() == 12345
    c.save(7)
    assert Cursor(tmp_path / "cur").load() == 7
    (tmp_path / "cur").write_text("ring-cursor 1 8 00000000\n")
    with pytest.raises(FormatError, match="checksum"):
        c.load()
    (tmp_path / "cur").write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError, match=str(tmp_path / "cur")):
        c.load()


def test_cursor_crash_during_save_keeps_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Cursor(tmp_path / "cur")
    c.save(41)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut before rename")

    monkeypatch.setattr(linerec_contract.durable.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        c.save(42)
    assert synced, "the temp file is fsynced before the rename"
    assert Cursor(tmp_path / "cur").load() == 41
    # A half-written temp file left behind by a crash does not disturb loading.
    (tmp_path / ".cur.tmp").write_bytes(b"ring-cur")
    assert Cursor(tmp_path / "cur").load() == 41


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.ring"
    w = _open(p)
    for i in range(3):
        _append(w, i)
    w.close()
    before = p.read_bytes()
    assert buffer_check_command(p, as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["records"], doc["oldest_seq"], doc["newest_seq"], doc["ok"]) == (3, 0, 2, True)
    _corrupt_slot(p, 1)
    assert buffer_check_command(p, as_json=False) == 1
    assert "corrupt slots: 1" in capsys.readouterr().out
    assert p.read_bytes() != before  # (damaged by the test, not by check)
    damaged = p.read_bytes()
    buffer_check_command(p, as_json=False)
    assert p.read_bytes() == damaged  # check never modifies
    (tmp_path / "junk").write_bytes(b"hello")
    assert buffer_check_command(tmp_path / "junk", as_json=False) == 2
    err = capsys.readouterr().err.strip()
    assert "junk" in err and "\n" not in err
    assert buffer_check_command(tmp_path / "missing", as_json=False) == 2


def test_live_check_races_a_running_writer_without_false_damage(tmp_path: Path) -> None:
    """The self-test checks the journal while capture appends. A plain scan then reports the
    race itself as damage (recovery, run after the scan, finds a newer record); the live check
    must not, yet must still report real damage."""
    p = tmp_path / "s.ring"
    w = _open(p, slots=32)
    stop = threading.Event()
    appended = [0]

    def write() -> None:
        i = 0
        while not stop.is_set():
            _append(w, i)
            i += 1
            appended[0] = i

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        strict_problems = live_problems = 0
        for _ in range(200):
            strict_problems += not check(p).ok
            rep = check_live(p)
            live_problems += not rep.ok
            assert rep.ok, rep.problems
        assert appended[0] > 2 * 32  # the writer wrapped the ring during the checks
    finally:
        stop.set()
        writer.join(10)
    # The race is real: the plain scan saw it at least once while the writer ran.
    assert strict_problems > 0 and live_problems == 0, (strict_problems, live_problems)
    _corrupt_slot(p, 7)
    rep = check_live(p)
    assert not rep.ok and rep.corrupt_slots == [7]
