"""``appliance buffer check``: a read-only full scan of a ring journal."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.buffer.fileio import FileIO
from appliance.buffer.format import RECORD_HEADER_SIZE, decode_record, is_empty_header
from appliance.buffer.recovery import SlotFile, locate_newest, read_file_header
from linerec_contract.errors import FormatError

_LIST_LIMIT = 1000  # longest list kept in the report; the counts are always exact
_CHUNK = 1 << 20


@dataclass
class CheckReport:
    """What a full scan found; ``ok`` when there is nothing to worry about."""

    path: str
    version: int
    slot_size: int
    slot_count: int
    stream_id: int
    created_ns: int
    first_seq: int
    records: int = 0
    oldest_seq: int | None = None
    newest_seq: int | None = None
    empty_slots: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    gap_count: int = 0
    corrupt_slots: list[int] = field(default_factory=list)
    corrupt_count: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "ok": self.ok, "version": self.version,
            "slot_size": self.slot_size, "slot_count": self.slot_count,
            "stream_id": self.stream_id, "created_ns": self.created_ns,
            "first_seq": self.first_seq, "records": self.records,
            "oldest_seq": self.oldest_seq, "newest_seq": self.newest_seq,
            "empty_slots": self.empty_slots,
            "gaps": [list(g) for g in self.gaps], "gap_count": self.gap_count,
            "corrupt_slots": self.corrupt_slots, "corrupt_count": self.corrupt_count,
            "problems": self.problems,
        }

    def summary_lines(self) -> list[str]:
        lines = [
            f"journal {self.path}: format v{self.version}, stream {self.stream_id}, "
            f"{self.slot_count} slots of {self.slot_size} bytes",
            f"records: {self.records}, oldest seq {self.oldest_seq}, newest seq {self.newest_seq}, "
            f"empty slots {self.empty_slots}",
        ]
        if self.gaps:
            shown = ", ".join(f"{a}..{b}" for a, b in self.gaps[:10])
            more = f" (+{self.gap_count - 10} more)" if self.gap_count > 10 else ""
            lines.append(f"missing seq ranges: {shown}{more}")
        if self.corrupt_slots:
            shown = ", ".join(str(s) for s in self.corrupt_slots[:10])
            more = f" (+{self.corrupt_count - 10} more)" if self.corrupt_count > 10 else ""
            lines.append(f"corrupt slots: {shown}{more}")
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.append("status: OK" if self.ok else "status: PROBLEMS FOUND")
        return lines


def check(path: Path, *, io: FileIO | None = None, live: bool = False) -> CheckReport:
    """Scan every slot of the journal at ``path`` without modifying it.

    ``live``: a capture stage may be appending while the scan runs, so bounded recovery (run
    after the scan) finding a newer record than the scan saw is not a problem; finding an
    older one still is. FormatError when the file is not a readable journal (bad header,
    truncated).
    """
    io = io or FileIO()
    path = Path(path)
    fd = io.open(path, write=False)
    try:
        geo = read_file_header(io, fd, path)
        rep = CheckReport(
            path=str(path), version=geo.version, slot_size=geo.slot_size,
            slot_count=geo.slot_count, stream_id=geo.stream_id, created_ns=geo.created_ns,
            first_seq=geo.first_seq,
        )
        seqs: dict[int, int] = {}
        per_chunk = max(1, _CHUNK // geo.slot_size)
        for first in range(0, geo.slot_count, per_chunk):
            count = min(per_chunk, geo.slot_count - first)
            data = io.pread(fd, count * geo.slot_size, geo.slot_offset(first))
            for i in range(count):
                slot = first + i
                chunk = data[i * geo.slot_size : (i + 1) * geo.slot_size]
                rec = decode_record(chunk, geo, slot)
                if rec is not None:
                    seqs[slot] = rec.seq
                elif is_empty_header(chunk[:RECORD_HEADER_SIZE]):
                    rep.empty_slots += 1
                else:
                    rep.corrupt_count += 1
                    if len(rep.corrupt_slots) < _LIST_LIMIT:
                        rep.corrupt_slots.append(slot)
        fast = locate_newest(SlotFile(io, fd, geo))
    finally:
        io.close(fd)
    _summarise(rep, seqs, None if fast is None else fast.seq, live)
    return rep


LIVE_SCANS = 3


def check_live(path: Path, *, io: FileIO | None = None, scans: int = LIVE_SCANS) -> CheckReport:
    """Check a journal that a capture stage may be writing (the self-test on a recording box).

    A scan races the writer: a slot read while it is rewritten reads torn, and a slot the writer
    rewrites just after the scan passed it, beside one rewritten just before, looks like a
    missing record. Neither is damage, and neither lasts: the writer moves on. Damage on the
    storage does. So the journal is judged by up to ``scans`` scans, and a problem is reported
    only when every scan finds one.
    """
    report = check(path, io=io, live=True)
    for _ in range(scans - 1):
        if report.ok:
            break
        report = check(path, io=io, live=True)
    return report


def _summarise(rep: CheckReport, seqs: dict[int, int], fast_newest: int | None,
               live: bool = False) -> None:
    if rep.corrupt_count:
        rep.problems.append(f"{rep.corrupt_count} corrupt slot(s) (bad CRC, torn or garbage)")
    if not seqs:
        if fast_newest is not None and not live:
            rep.problems.append(f"recovery found seq {fast_newest} but the full scan found none")
        return
    newest = max(seqs.values())
    start = max(rep.first_seq, newest - rep.slot_count + 1)
    present = sorted(s for s in seqs.values() if s >= start)
    rep.newest_seq, rep.oldest_seq, rep.records = newest, present[0], len(present)
    expect = start
    for s in present:
        if s > expect:
            _add_gap(rep, expect, s - 1)
        expect = s + 1
    if rep.gap_count:
        rep.problems.append(f"{rep.gap_count} missing seq range(s) between oldest and newest")
    if fast_newest != newest and not (live and fast_newest is not None and fast_newest > newest):
        rep.problems.append(
            f"bounded recovery finds newest seq {fast_newest}, full scan finds {newest}"
        )


def _add_gap(rep: CheckReport, first: int, last: int) -> None:
    rep.gap_count += 1
    if len(rep.gaps) < _LIST_LIMIT:
        rep.gaps.append((first, last))


def buffer_check_command(path: Path, as_json: bool) -> int:
    """Print the check report; 0 clean, 1 problems found, 2 unreadable or not a journal."""
    try:
        report = check(path)
    except FormatError as err:
        print(f"appliance buffer check: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"appliance buffer check: {path}: cannot read: {err.strerror}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    else:
        print("\n".join(report.summary_lines()))
    return 0 if report.ok else 1
