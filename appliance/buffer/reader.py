"""Read-only, non-blocking access to a ring journal that another process may be writing."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from appliance.buffer.fileio import FileIO
from appliance.buffer.format import FileHeader, Gap, Record
from appliance.buffer.recovery import SlotFile, locate_newest, locate_oldest, read_file_header

# While stalled on a missing record, search for newer records (proof of loss) this often.
SEARCH_INTERVAL_S = 0.25
# Overrun resolution retries when the writer laps the reader again while it catches up.
_OVERRUN_TRIES = 8


class RingReader:
    """Returns records in seq order, and a :class:`Gap` for each run it cannot return.

    A missing record is only reported as lost once a newer valid record proves the writer has
    moved past it; a slot being written right now just ends the poll.
    """

    def __init__(self, path: Path, *, io: FileIO | None = None) -> None:
        """Open ``path`` read-only; the position starts at the oldest record held."""
        self._io = io or FileIO()
        self._path = Path(path)
        fd = self._io.open(self._path, write=False)
        try:
            geo = read_file_header(self._io, fd, self._path)
        except BaseException:
            self._io.close(fd)
            raise
        self._sf = SlotFile(self._io, fd, geo)
        self._closed = False
        self._proof = -1  # highest seq seen valid: every lower seq has been written
        self._searched_at = float("-inf")
        self._prev_end: int | None = None  # frame position right after the last delivered record
        oldest = self.oldest_seq()
        self._next = geo.first_seq if oldest is None else oldest

    @property
    def header(self) -> FileHeader:
        return self._sf.geo

    @property
    def next_seq(self) -> int:
        return self._next

    def seek(self, seq: int) -> None:
        """Make ``seq`` the next record to return."""
        if seq < 0:
            raise ValueError(f"seq {seq}: expected >= 0")
        self._next = seq
        self._prev_end = None

    def get(self, seq: int) -> Record | None:
        """The record ``seq`` if the ring still holds it intact, else None."""
        return self._sf.get(seq)

    def newest_seq(self) -> int | None:
        rec = locate_newest(self._sf)
        if rec is None:
            return None
        self._proof = max(self._proof, rec.seq)
        return rec.seq

    def oldest_seq(self) -> int | None:
        newest = self.newest_seq()
        return None if newest is None else locate_oldest(self._sf, newest)

    def poll(self, max_records: int = 64) -> list[Record | Gap]:
        """Up to ``max_records`` items from ``next_seq`` on; [] when nothing new is readable yet."""
        out: list[Record | Gap] = []
        n = self._sf.geo.slot_count
        budget = 4 * max_records + 16  # every pass delivers, emits a gap, or stops
        while len(out) < max_records and budget > 0:
            budget -= 1
            s = self._next
            rec = self._sf.load(s % n)
            if rec is not None and rec.seq == s:
                self._deliver(rec, out)
                continue
            if rec is None or rec.seq < s:
                newest = self._newer_than(s)
                if newest is None:
                    break  # not written yet, or being written right now
                # Re-read after the proof: the write of ``s`` may have completed meanwhile.
                rec = self._sf.load(s % n)
                if rec is not None and rec.seq == s:
                    self._deliver(rec, out)
                    continue
                if newest < s + n and (rec is None or rec.seq < s):
                    if not self._corrupt(s, newest, out):
                        break
                    continue
            if not self._overrun(s, out):
                break
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._io.close(self._sf.fd)

    def __enter__(self) -> RingReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _deliver(self, rec: Record, out: list[Record | Gap]) -> None:
        out.append(rec)
        self._prev_end = rec.frame_pos + rec.frames
        self._next = rec.seq + 1
        self._proof = max(self._proof, rec.seq)

    def _gap(self, first: int, nxt: Record, reason: str, out: list[Record | Gap]) -> None:
        """Report ``first .. nxt.seq-1`` lost; frames from the neighbours' frame positions."""
        frames: int | None = None
        if self._prev_end is not None:
            lost = nxt.frame_pos - nxt.gap_frames - self._prev_end
            frames = lost if lost >= 0 else None
        out.append(Gap(first_seq=first, last_seq=nxt.seq - 1, frames=frames, reason=reason))
        # The next record's own gap_frames are reported with it, not in this Gap.
        self._prev_end = nxt.frame_pos - nxt.gap_frames
        self._next = nxt.seq

    def _newer_than(self, s: int) -> int | None:
        """A seq > s known to hold (or have held) a valid record, or None if none is known."""
        if self._proof > s:
            return self._proof
        nxt = self._sf.load((s + 1) % self._sf.geo.slot_count)
        if nxt is not None and nxt.seq > s:
            self._proof = max(self._proof, nxt.seq)
            return nxt.seq
        now = self._io.monotonic()
        if now - self._searched_at < SEARCH_INTERVAL_S:
            return None
        self._searched_at = now
        newest = self.newest_seq()
        return newest if newest is not None and newest > s else None

    def _corrupt(self, s: int, newest: int, out: list[Record | Gap]) -> bool:
        """Slot ``s`` will never become valid: report the run of lost seqs up to the next record."""
        n = self._sf.geo.slot_count
        for t in range(s + 1, min(newest, s + n - 1) + 1):
            rec = self._sf.load(t % n)
            if rec is not None and rec.seq == t:
                self._gap(s, rec, "corrupt", out)
                return True
            if rec is not None and rec.seq > t:
                # The writer lapped us inside the corrupt run; the rest is an overrun.
                out.append(Gap(first_seq=s, last_seq=t - 1, frames=None, reason="corrupt"))
                self._prev_end = None
                self._next = t
                return True
        return False

    def _overrun(self, s: int, out: list[Record | Gap]) -> bool:
        """The writer overwrote ``s``: skip to the oldest record still held."""
        n = self._sf.geo.slot_count
        for _ in range(_OVERRUN_TRIES):
            newest = self.newest_seq()
            if newest is None:
                return False
            for t in range(max(s + 1, newest - n + 1), newest + 1):
                rec = self._sf.load(t % n)
                if rec is not None and rec.seq == t:
                    self._gap(s, rec, "overrun", out)
                    return True
                if rec is not None and rec.seq > t:
                    break  # lapped again while catching up: look for the new oldest
        return False
