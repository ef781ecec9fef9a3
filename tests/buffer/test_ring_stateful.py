"""Hypothesis state machine: the ring (real files) against an in-memory model of what it holds."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appliance.buffer import Flags, Gap, Record, RingReader, RingWriter, SampleFormat
from appliance.buffer.format import FILE_HEADER_SIZE

SLOTS = 8
SLOT = 4096


class RingModel(RuleBasedStateMachine):
    """Model: every record ever appended (by seq) and the reader's expected position."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ring-model-"))
        self.path = self.dir / "r.ring"
        self.writer = self._open()
        self.reader = RingReader(self.path)
        self.model: dict[int, Record] = {}
        self.frame_pos = 0
        self.pos = 0  # reader's next seq in the model
        self.prev_end: int | None = None  # frame position after the last record the reader got

    def _open(self) -> RingWriter:
        return RingWriter.open(
            self.path, stream_id=1, size_bytes=FILE_HEADER_SIZE + SLOTS * SLOT, slot_size=SLOT,
            sync_interval_s=0.01,
        )

    @property
    def next_seq(self) -> int:
        return max(self.model, default=-1) + 1

    def held(self) -> range:
        return range(max(0, self.next_seq - SLOTS), self.next_seq)

    @rule(frames=st.integers(0, 1000), gap=st.integers(0, 3), xrun=st.booleans())
    def append(self, frames: int, gap: int, xrun: bool) -> None:
        flags = (Flags.GAP if gap else Flags.NONE) | (Flags.XRUN if xrun else Flags.NONE)
        pos = self.frame_pos + gap
        payload = (self.next_seq.to_bytes(4, "little") * frames)[: frames * 4]
        seq = self.writer.append(
            payload, frames=frames, channels=2, rate=16000, sample_format=SampleFormat.S16_LE,
            frame_pos=pos, flags=flags, gap_frames=gap, mono_ns=seq_time(pos), wall_ns=pos,
        )
        assert seq == self.next_seq
        self.model[seq] = Record(
            stream_id=1, seq=seq, boot_id=self.writer.boot_id, mono_ns=seq_time(pos),
            wall_ns=pos, frame_pos=pos, frames=frames, channels=2,
            sample_format=SampleFormat.S16_LE, rate=16000, flags=flags, gap_frames=gap,
            payload=payload,
        )
        self.frame_pos = pos + frames

    @rule()
    def sync(self) -> None:
        self.writer.sync()
        assert self.writer.synced_seq == (self.next_seq - 1 if self.model else None)

    @rule(clean=st.booleans())
    def reopen_writer(self, clean: bool) -> None:
        if clean:
            self.writer.close()
        else:  # process death: the descriptor goes, the page cache stays
            os.close(self.writer._fd)  # type: ignore[arg-type]
            self.writer._fd = None
        self.writer = self._open()
        assert self.writer.recovery_note is None
        assert self.writer.next_seq == self.next_seq

    @rule(max_records=st.integers(1, 12))
    def poll(self, max_records: int) -> None:
        got = self.reader.poll(max_records)
        assert len(got) <= max_records
        for item in got:
            if isinstance(item, Gap):
                assert item.reason == "overrun"
                assert item.first_seq == self.pos
                assert item.last_seq + 1 == self.held().start
                lost = [self.model[s] for s in range(item.first_seq, item.last_seq + 1)]
                expect = (
                    None if self.prev_end is None
                    else sum(r.frames + r.gap_frames for r in lost)
                )
                assert item.frames == expect
                self.pos = item.last_seq + 1
                nxt = self.model[self.pos]
                self.prev_end = nxt.frame_pos - nxt.gap_frames
            else:
                assert item == self.model[self.pos]
                self.pos += 1
                self.prev_end = item.frame_pos + item.frames
        assert self.reader.next_seq == self.pos
        if len(got) < max_records:
            assert self.pos == self.next_seq  # ran dry only at the end

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def seek(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.next_seq))
        self.reader.seek(seq)
        self.pos = seq
        self.prev_end = None

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.next_seq + 2))
        expect = self.model[seq] if seq in self.held() else None
        assert self.reader.get(seq) == expect

    @invariant()
    def ends_match(self) -> None:
        held = self.held()
        assert self.reader.newest_seq() == (held[-1] if held else None)
        assert self.reader.oldest_seq() == (held[0] if held else None)

    def teardown(self) -> None:
        self.writer.close()
        self.reader.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def seq_time(pos: int) -> int:
    return 1_000_000 + pos * 62_500


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
