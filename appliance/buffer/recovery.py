"""Finding the newest valid record in bounded time: binary search over slots, then a local scan.

Sequence numbers are monotonic around the ring (slot = seq % slot_count), so the "lap" of each slot
(seq // slot_count) is non-increasing from slot 0 to the newest record and one lower after it.
A binary search over that step finds the neighbourhood of the newest record with log2(slots)
header reads; a bounded scan around it fixes up what a power cut can leave there (unsynced
records missing or torn in any order). See docs/ring-format.md, "Recovery".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.buffer.fileio import FileIO
from appliance.buffer.format import (
    FILE_HEADER_SIZE,
    RECORD_HEADER_SIZE,
    FileHeader,
    Record,
    decode_file_header,
    decode_record,
    is_empty_header,
    peek_header,
)
from linerec_contract.errors import FormatError

# Local scan: stop after this many consecutive slots without a newer record. A power cut can
# lose unsynced records out of order; holes up to this long before the newest record are found.
SCAN_WINDOW = 256
# Local scan: slots read per system call.
SCAN_BATCH = 16
# Binary search: how far to look beside a probe that hit an unreadable slot.
PROBE_NEIGHBOURS = 8


def read_file_header(io: FileIO, fd: int, path: Path) -> FileHeader:
    """The checked file header of an open journal, also checking the file is not truncated."""
    data = io.pread(fd, FILE_HEADER_SIZE, 0)
    hdr = decode_file_header(data, str(path))
    size = io.size(fd)
    if size < hdr.file_size:
        raise FormatError(
            f"{path}: truncated, {size} bytes, expected {hdr.file_size} "
            f"({hdr.slot_count} slots of {hdr.slot_size})"
        )
    if size > hdr.file_size:
        raise FormatError(
            f"{path}: {size} bytes, expected exactly {hdr.file_size} "
            f"({hdr.slot_count} slots of {hdr.slot_size})"
        )
    return hdr


@dataclass
class SlotFile:
    """Read access to the slots of one open journal."""

    io: FileIO
    fd: int
    geo: FileHeader

    def slot_of(self, seq: int) -> int:
        return seq % self.geo.slot_count

    def load(self, slot: int) -> Record | None:
        """The fully checked record in ``slot`` (any seq), or None."""
        head = self.io.pread(self.fd, RECORD_HEADER_SIZE, self.geo.slot_offset(slot))
        sh = peek_header(head, self.geo, slot)
        if sh is None:
            return None
        data = self.io.pread(
            self.fd, RECORD_HEADER_SIZE + sh.payload_len, self.geo.slot_offset(slot)
        )
        return decode_record(data, self.geo, slot)

    def get(self, seq: int) -> Record | None:
        """The record with exactly this seq, or None."""
        if seq < 0:
            return None
        rec = self.load(self.slot_of(seq))
        return rec if rec is not None and rec.seq == seq else None

    def key(self, slot: int) -> int | None:
        """The seq a slot's header claims; for a never-written slot the seq it stands in for.

        A blank slot acts as holding the newest seq below ``first_seq`` that maps to it, so a
        journal that has not wrapped yet still looks monotonic. None for an unreadable slot.
        """
        head = self.io.pread(self.fd, RECORD_HEADER_SIZE, self.geo.slot_offset(slot))
        return self._key(head, slot)

    def keys(self, first: int, count: int) -> list[int | None]:
        """:meth:`key` of ``count`` consecutive slots from ``first`` (no wrap), in one read."""
        size = self.geo.slot_size
        data = self.io.pread(self.fd, count * size, self.geo.slot_offset(first))
        return [
            self._key(data[i * size : i * size + RECORD_HEADER_SIZE], first + i)
            for i in range(count)
        ]

    def _key(self, head: bytes, slot: int) -> int | None:
        sh = peek_header(head, self.geo, slot)
        if sh is not None:
            return sh.seq
        if len(head) == RECORD_HEADER_SIZE and is_empty_header(head):
            n, first = self.geo.slot_count, self.geo.first_seq
            return first - 1 - ((first - 1 - slot) % n)
        return None

    def lap(self, slot: int) -> int | None:
        k = self.key(slot)
        return None if k is None else (k - slot) // self.geo.slot_count


def _known_near(sf: SlotFile, mid: int, lo: int, hi: int) -> tuple[int, int] | None:
    """A readable slot in (lo, hi) closest to ``mid`` and its lap, probing a few neighbours."""
    for d in range(PROBE_NEIGHBOURS + 1):
        for cand in (mid + d, mid - d) if d else (mid,):
            if lo < cand < hi:
                lap = sf.lap(cand)
                if lap is not None:
                    return cand, lap
    return None


def _boundary(sf: SlotFile) -> int:
    """A slot near the newest record: the last slot whose lap is at least that of slot 0."""
    n = sf.geo.slot_count
    ref = _known_near(sf, 0, -1, n)
    if ref is None:
        return 0
    lo, lap0 = ref
    hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = _known_near(sf, mid, lo, hi)
        if got is None:
            hi = mid  # nothing readable here: keep the earlier half, the scan looks further
        elif got[1] >= lap0:
            lo = got[0]
        else:
            hi = got[0]
    return lo


def locate_newest(sf: SlotFile, window: int | None = None) -> Record | None:
    """The valid record with the highest seq near the write position, or None if there is none.

    Reads O(log slots + window) slots whatever the ring size.
    """
    n = sf.geo.slot_count
    window = min(SCAN_WINDOW if window is None else window, n)
    start = _boundary(sf)
    best: Record | None = None
    # Backward: the nearest fully valid record at or before the boundary (a torn newest
    # record only has a good header).
    for back in range(window):
        rec = sf.load((start - back) % n)
        if rec is not None:
            best = rec
            break
    # Forward: newer records beyond holes and torn slots, until a window without progress.
    best_claim = -1 if best is None else best.seq
    misses = 0
    for slot, k in _keys_after(sf, start):
        if k is not None and k > best_claim:
            rec = sf.load(slot)
            if rec is not None and (best is None or rec.seq > best.seq):
                best = rec
                best_claim = rec.seq
                misses = 0
                continue
        misses += 1
        if misses >= window:
            break
    return best


def _keys_after(sf: SlotFile, start: int) -> Iterator[tuple[int, int | None]]:
    """(slot, key) for every slot after ``start`` once around the ring, read in batches."""
    n = sf.geo.slot_count
    slot, left = (start + 1) % n, n - 1
    while left > 0:
        count = min(SCAN_BATCH, n - slot, left)
        for i, k in enumerate(sf.keys(slot, count)):
            yield slot + i, k
        left -= count
        slot = (slot + count) % n


def locate_oldest(sf: SlotFile, newest: int) -> int | None:
    """The lowest seq still held by the ring (at most one lap behind ``newest``)."""
    n = sf.geo.slot_count
    first = max(sf.geo.first_seq, newest - n + 1, 0)
    for seq in range(first, newest + 1):
        if sf.get(seq) is not None:
            return seq
    return None
