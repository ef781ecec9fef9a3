"""The recorder+sealer process: ring journal -> call detection -> parts -> sealed segments -> outbox.

Durable state is one checkpoint file (``state.json``) plus one spool file per line with an open
part. A checkpoint is taken only between two journal records, so every line's detector, open
call and spool length describe the same instant, and on restart the recorder resumes from the
checkpoint's cursor and reprocesses the journal deterministically.

Sealing is a two-phase commit with the outbox (see docs/recorder.md):
1. every part finished while processing a record is sealed and *prepared* in the outbox (a
   hidden, fsynced file named by its sequence number);
2. the checkpoint that advances ``next_seq`` past them is written;
3. the prepared files are committed (renamed), which makes them visible to the uplink.
A crash before (2) discards the prepared files on restart (the journal is read again and the
same parts are sealed again under the same numbers); a crash after (2) commits them on restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from appliance import sdnotify
from appliance.buffer import Flags, Gap, Record, RingReader
from appliance.config import CaptureSection, Config
from appliance.recorder.callmeta import INBOUND_WINDOW_S, OpenCall, avoid_leaks, part_meta
from appliance.recorder.detect import CALL_START, CallDetector, DetectorEvent
from appliance.recorder.lineproc import Analysis
from appliance.recorder.lines import LineState, line_setup
from appliance.recorder.spool import Spool, remove_unreferenced
from appliance.sync.outbox import outbox_for
from linerec_contract.durable import atomic_write_json, ensure_dir, fsync_dir, write_status
from linerec_contract.errors import ApplianceError, ConfigError, FormatError
from linerec_contract.identity import DeviceKey
from linerec_contract.manifest import FIRST_SEQ
from linerec_contract.segment import SegmentInput, decode_wire, encode_wire, seal_segment

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_FILLED_GAP_S = 10.0
MAX_BATCH = 1024
MAX_ALARMS = 20
NEXT_KEY_FILE = "device.next.key"
REOPEN_CHECK_S = 1.0


@dataclass
class PendingSeal:
    """A finished part waiting for the end of the record being processed."""

    line: LineState
    call: OpenCall
    spool: Spool
    frames: int
    last: bool
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StreamState:
    section: CaptureSection
    path: Path
    reader: RingReader | None = None
    inode: int = 0
    checked_at: float = 0.0
    cursor: int | None = None
    expect_frame: int | None = None
    rate: int = 0
    anchor: tuple[int, int] = (0, 0)
    lines: list[LineState] = field(default_factory=list)
    gap_reason: str = "lost"
    stopped_at: int | None = None
    """Where the journal was when the recorder last stopped cleanly (until the next record)."""

    def wall_ns(self, frame: int) -> int:
        anchor_frame, anchor_wall = self.anchor
        return anchor_wall + (frame - anchor_frame) * 1_000_000_000 // max(self.rate, 1)


STATUS_EVERY_S = 0.9
"""The status file is rewritten this often (appliance status calls a stage stale after 2 s)."""


class Recorder:
    """Turns the journal of every capture stream into sealed segments in the outbox."""

    def __init__(self, cfg: Config, *, recipients: list[str], key: DeviceKey) -> None:
        if not recipients:
            raise ConfigError("seal.recipients is empty and keys/recipients.txt holds no age1 key")
        self.cfg = cfg
        self.recipients = recipients
        self.key = key
        self.dir = cfg.state_dir / "recorder"
        self.spool_dir = self.dir / "spool"
        ensure_dir(self.dir)
        ensure_dir(self.spool_dir, 0o700)  # call audio
        self.state_path = self.dir / "state.json"
        # The quota and disk-full policy live in the outbox (uplink.outbox_max_mb, ...).
        self.outbox = outbox_for(cfg)
        self.unrecorded: list[dict[str, Any]] = []
        self.next_seq = FIRST_SEQ
        self.prev_hash: str | None = None
        self.spool_gen = 0
        self.rotation: dict[str, Any] | None = None
        self.sealed = 0
        self.calls_started = 0
        self._pending: list[PendingSeal] = []
        self._last_checkpoint = 0.0
        self._last_status = 0.0
        self.caught_up = False
        self.alarms: list[dict[str, Any]] = []
        self._spool_losses: list[tuple[LineState, int, int, bool]] = []
        self._retired: list[Spool] = []
        """Spools of discarded calls: the checkpoint still names them until the next one."""
        self.streams = [
            StreamState(section=s, path=cfg.ring_path(s.name)) for s in cfg.capture
        ]
        self._recover()

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        state = self._load_state()
        if state is None:
            highest = self.outbox.highest_seq()
            self.next_seq = FIRST_SEQ if highest is None else highest + 1
            if highest is not None:
                self.prev_hash = self._manifest_hash_in_outbox(highest)
                log.warning("recorder state missing: continuing at segment %d (%s)", self.next_seq,
                            "chain continued from the outbox" if self.prev_hash
                            else "chain link LOST: central will report a broken link")
                if self.prev_hash is None:
                    self.prev_hash = "0" * 64
        else:
            self.next_seq = int(state["next_seq"])
            self.prev_hash = state["prev_manifest_sha256"]
            self.spool_gen = int(state["spool_gen"])
            self.rotation = state.get("rotation")
            self.unrecorded = list(state.get("unrecorded", []))
            for stream in self.streams:
                self._restore_stream(stream, state["streams"].get(stream.section.name))
        # Phase 3 of the seal commit: prepared segments the checkpoint covers are published.
        for seq in self.outbox.prepared():
            if seq < self.next_seq:
                self.outbox.commit(seq)
            else:
                self.outbox.discard_prepared(seq)
        keep = {ln.spool.path for s in self.streams for ln in s.lines if ln.spool is not None}
        remove_unreferenced(self.spool_dir, keep)
        for line, kept, committed, found in self._spool_losses:
            self._spool_lost(line, kept, committed, found)
        self._spool_losses = []
        if self._pending:
            self._seal_pending()
        if self.rotation is not None and self.rotation["seq"] < self.next_seq:
            self._finish_rotation()

    def _manifest_hash_in_outbox(self, seq: int) -> str | None:
        for read in (self.outbox.read, self._read_prepared):
            try:
                return decode_wire(read(seq)).manifest_sha256
            except (OSError, FormatError):
                continue
        return None

    def _read_prepared(self, seq: int) -> bytes:
        return self.outbox.prep_path(seq).read_bytes()

    def _load_state(self) -> dict[str, Any] | None:
        import json

        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        try:
            state: dict[str, Any] = json.loads(text)
            if state.get("v") != STATE_VERSION:
                raise FormatError(f"version {state.get('v')!r}, expected {STATE_VERSION}")
        except (ValueError, FormatError) as err:
            aside = self.state_path.with_name(f"state.bad-{int(time.time())}.json")
            self.state_path.rename(aside)
            log.error("recorder state %s unreadable (%s): moved to %s, starting fresh",
                      self.state_path, err, aside)
            return None
        return state

    def _restore_stream(self, stream: StreamState, st: dict[str, Any] | None) -> None:
        if st is None:
            return
        stream.cursor = st["cursor"]
        stream.expect_frame = st["expect_frame"]
        stream.rate = st["rate"]
        stream.anchor = (st["anchor"][0], st["anchor"][1])
        stream.stopped_at = st.get("stopped_at")
        for ln in st["lines"]:
            line = LineState.from_state(ln, line_setup(self.cfg.recorder, ln["line"], stream.rate))
            if ln["call"] is not None:
                line.call = OpenCall(**ln["call"])
                line.spool = Spool(self.spool_dir, line.line, ln["spool_gen"])
                committed = int(ln["spool_frames"])
                if line.spool.frames < committed:
                    # Frames the checkpoint declared durable are gone: never sealed as silence.
                    self._spool_losses.append((line, line.spool.frames, committed,
                                               line.spool.found))
                else:
                    # Frames appended after the checkpoint are read from the journal again.
                    line.spool.truncate(committed)
            stream.lines.append(line)

    def _spool_lost(self, line: LineState, kept: int, committed: int, found: bool) -> None:
        """The open part's spool is missing or shorter than the checkpoint says: what is left
        is sealed as a part of its own and the next part starts after the lost frames, with a
        gap note naming them; the loss is raised as an alarm."""
        assert line.call is not None and line.spool is not None
        call = line.call
        at, lost = call.part_start_frame + kept, committed - kept
        log.error("line %s: spool %s %s: %d frames of call %s lost at frame %d", line.line,
                  line.spool.path.name, "short" if found else "missing", lost, call.call_id, at)
        self._alarm("spool-lost", line=line.line, call_id=call.call_id, at_frame=at,
                    frames=lost, spool="short" if found else "missing")
        if kept > 0:
            self._cut_part(line, kept)
        call.part_start_frame = at + lost
        call.gaps.append({"reason": "spool-lost", "at_frame": at, "frames": lost})

    # -- checkpoint -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        streams = {}
        for s in self.streams:
            streams[s.section.name] = {
                "cursor": s.cursor,
                "expect_frame": s.expect_frame,
                "rate": s.rate,
                "anchor": list(s.anchor),
                "lines": [ln.to_state() for ln in s.lines],
                "stopped_at": s.stopped_at,
            }
        return {
            "v": STATE_VERSION,
            "next_seq": self.next_seq,
            "prev_manifest_sha256": self.prev_hash,
            "spool_gen": self.spool_gen,
            "rotation": self.rotation,
            "unrecorded": self.unrecorded,
            "streams": streams,
        }

    def checkpoint(self) -> None:
        for s in self.streams:
            for ln in s.lines:
                if ln.spool is not None:
                    ln.spool.sync()
        # Durability: this file is the recorder's commit point (cursor, detectors, next_seq).
        # 0600: open calls' metadata (caller ID, and the digits dialled when masking is off).
        atomic_write_json(self.state_path, self._state(), mode=0o600)
        self._last_checkpoint = time.monotonic()
        for spool in self._retired:
            spool.remove()
        self._retired = []

    # -- processing -------------------------------------------------------------------------

    def step(self) -> int:
        """Process what the journals hold now; return the number of records handled."""
        handled = 0
        for stream in self.streams:
            reader = self._reader(stream)
            if reader is None:
                continue
            if stream.cursor is None:
                oldest = reader.oldest_seq()
                if oldest is None:
                    continue
                stream.cursor = oldest
            reader.seek(stream.cursor)
            batch: list[Record] = []
            for item in reader.poll(MAX_BATCH):
                handled += 1
                if isinstance(item, Gap):
                    self._process_batch(stream, batch)
                    batch = []
                    stream.gap_reason = item.reason
                    stream.cursor = item.last_seq + 1
                    continue
                if batch and (item.frame_pos != batch[-1].frame_pos + batch[-1].frames
                              or item.channels != batch[-1].channels or item.flags):
                    self._process_batch(stream, batch)
                    batch = []
                batch.append(item)
            self._process_batch(stream, batch)
        now = time.monotonic()
        if handled and now - self._last_checkpoint >= self.cfg.recorder.commit_interval_s:
            self.checkpoint()
        return handled

    def _reader(self, stream: StreamState) -> RingReader | None:
        """The stream's journal reader, (re)opened when capture created or replaced the file."""
        now = time.monotonic()
        if stream.reader is not None and now - stream.checked_at < REOPEN_CHECK_S:
            return stream.reader
        stream.checked_at = now
        try:
            inode = os.stat(stream.path).st_ino
        except FileNotFoundError:
            return stream.reader
        if stream.reader is not None and inode == stream.inode:
            return stream.reader
        try:
            reader = RingReader(stream.path)
        except (OSError, ApplianceError) as err:
            log.warning("journal %s not readable yet: %s", stream.path, err)
            return stream.reader
        if stream.reader is not None:
            # Capture moved a bad journal aside and started a fresh one: follow it from its
            # oldest record; the jump in frame positions becomes a gap note.
            log.warning("journal %s was replaced: following the new file", stream.path)
            self._alarm("journal-replaced", stream=stream.section.name)
            stream.reader.close()
            stream.cursor = None
        stream.reader, stream.inode = reader, inode
        return reader

    def _alarm(self, kind: str, **detail: Any) -> None:
        """Alarms are kept in the status file (shown by `appliance status`) and logged."""
        self.alarms.append({"kind": kind, "ts": time.time(), **detail})
        del self.alarms[:-MAX_ALARMS]

    def _process_batch(self, stream: StreamState, batch: list[Record]) -> None:
        """Contiguous records are processed as one block (the detector is chunking-invariant)."""
        if not batch:
            return
        first, last = batch[0], batch[-1]
        self._ensure_lines(stream, first)
        if stream.expect_frame is not None and first.frame_pos != stream.expect_frame:
            lost = first.frame_pos - stream.expect_frame
            reason = stream.gap_reason
            if first.flags & Flags.XRUN:
                reason = "xrun"
            elif first.flags & Flags.GAP:
                reason = "capture-gap"
            if lost > 0 and stream.stopped_at == stream.expect_frame:
                self._resume_after_stop(stream, stream.expect_frame, lost, reason)
            else:
                self._handle_gap(stream, stream.expect_frame, lost, reason)
        stream.gap_reason = "lost"
        stream.stopped_at = None
        stream.anchor = (first.frame_pos, first.wall_ns)
        payload = b"".join(r.payload for r in batch)
        frames = last.frame_pos + last.frames - first.frame_pos
        pcm = np.frombuffer(payload, dtype="<i2").reshape(frames, first.channels)
        # One transpose, so that every line's detectors read contiguous samples.
        by_line = np.ascontiguousarray(pcm.T).astype(np.int16, copy=False)
        for line in stream.lines:
            self._process_line(stream, line, first.frame_pos, by_line[line.channel], first.seq)
        stream.expect_frame = first.frame_pos + frames
        stream.anchor = (last.frame_pos, last.wall_ns)
        # The checkpoint a seal takes must describe the instant after this batch.
        stream.cursor = last.seq + 1
        if self._pending:
            self._seal_pending()

    def _ensure_lines(self, stream: StreamState, rec: Record) -> None:
        if stream.lines:
            if rec.channels != len(stream.lines):
                raise FormatError(f"stream {stream.section.name}: record {rec.seq} has "
                                  f"{rec.channels} channels, the journal had {len(stream.lines)}")
            return
        stream.rate = rec.rate
        ids = stream.section.line_ids(rec.channels, single_stream=len(self.streams) == 1)
        stream.lines = [LineState.new(lid, i, line_setup(self.cfg.recorder, lid, rec.rate))
                        for i, lid in enumerate(ids)]

    def _handle_gap(self, stream: StreamState, at: int, frames: int, reason: str) -> None:
        """Audio the journal does not hold: filled with silence, or the calls are closed."""
        log.warning("stream %s: %d frames lost at frame %d (%s)",
                    stream.section.name, frames, at, reason)
        self._alarm("audio-lost", stream=stream.section.name, at_frame=at, frames=frames,
                    reason=reason)
        note = {"at_frame": at, "frames": frames, "reason": reason}
        if 0 < frames <= MAX_FILLED_GAP_S * stream.rate:
            for line in stream.lines:
                if line.call is not None:
                    line.call.gaps.append(note)
                zeros = np.zeros(frames, dtype=np.int16)
                self._process_line(stream, line, at, zeros, None)
            return
        for line in stream.lines:
            if line.call is not None and line.spool is not None:
                line.call.gaps.append(note)
                self._close_call(line, line.call.part_start_frame + line.spool.frames)
            line.detector = CallDetector(line.setup.detector)

    def _resume_after_stop(self, stream: StreamState, at: int, frames: int, reason: str) -> None:
        """The first audio after a clean stop, ``frames`` after the last audio before it.

        The downtime is not silence the detector may end a call on: each open call waits for
        the audio after the restart. Voice within the stop delay continues it as its next part
        (``_continue_call``); otherwise it ended while the box was down, and its held-back
        tail is sealed as its last part (``_detect``). Either way the downtime is a gap note.
        """
        log.info("stream %s: %d frames (%.1f s) not captured while the box was stopped",
                 stream.section.name, frames, frames / max(stream.rate, 1))
        note = {"at_frame": at, "frames": frames, "reason": reason}
        for line in stream.lines:
            if line.call is not None and line.spool is not None:
                line.detector.suspend()
                line.call.resumed = note

    def _continue_call(self, stream: StreamState, line: LineState, block_start: int,
                       seq: int | None) -> None:
        """Voice after the restart: the call stopped with the box goes on as its next part,
        from the first frame captured after the restart."""
        assert line.call is not None and line.spool is not None and line.call.resumed is not None
        note = line.call.resumed
        if line.spool.frames > 0:
            self._cut_part(line, line.spool.frames)
        history, first = self._history(stream, line.channel, note["at_frame"] + note["frames"],
                                       block_start, seq)
        # A new object: the events of the block being processed are added from the analyzer's
        # memory below, not a second time by _process_line.
        call = line.call = line.call.copy()
        call.resumed = None
        call.part_start_frame = first
        call.gaps.append({**note, "frames": first - note["at_frame"]})
        line.spool.append(line.analyzer.mask(history, first))
        for e in line.analyzer.recent:  # this block's own events: _take_events, by frame
            if first <= e["frame"] < block_start:
                call.add(e)

    def _process_line(self, stream: StreamState, line: LineState, start: int,
                      block: np.ndarray, seq: int | None) -> None:
        """Analysis first (DTMF, tones, caller ID, masks), then call detection on the same block,
        cut at the frames where a tone ends a call, and the masked audio into the spool."""
        end = start + len(block)
        line.poll_pause_requests(self.cfg.state_dir, stream.anchor, stream.rate, start, end)
        an = line.analyzer.process(start, block)
        if line.call is not None and line.spool is not None:
            for sp in an.backfill:
                a = max(sp.start, line.call.part_start_frame)
                if a < sp.end:
                    line.spool.overwrite(a - line.call.part_start_frame,
                                         line.analyzer.fill(a, sp.end, sp.level_dbfs))
        masked = line.analyzer.mask(block, start)
        a = start
        for frame, action, tone_start in [*an.controls, (end, "", 0)]:
            frame = min(max(frame, a), end)
            if frame > a:
                self._detect(stream, line, a, block[a - start:frame - start],
                             masked[a - start:frame - start], seq, an, (start, block))
                a = frame
            ev: DetectorEvent | None = None
            if action == "end_call":
                ev = line.detector.force_end(frame, tone_start)
            elif action == "tone_over" and line.detector.in_call and \
                    line.detector.voice_start >= tone_start - line.setup.detector.frame_len:
                ev = line.detector.force_end(frame, tone_start)
            if ev is not None and line.call is not None and line.spool is not None:
                self._end_call(line, ev, frame, an)
        if line.call is not None and line.call.resumed is None:
            self._take_events(line, an, end)
        line.health.measure(block)
        in_call = None if line.call is None else end - line.call.call_start_frame
        for alarm in line.health.check_alarms(in_call, stream.wall_ns(end)):
            self._alarm(alarm.pop("kind"), line=line.line, **alarm)

    def _take_events(self, line: LineState, an: Analysis, upto: int) -> None:
        """The open call takes this block's events from before frame ``upto``: those from its
        first frame on, and caller ID and tones from the window before it (ringing). Events
        are taken by their frames before the audio they describe is spooled or cut, so a call
        holds the same events however the audio was cut into blocks."""
        call = line.call
        if call is None:
            return
        window = round(INBOUND_WINDOW_S * line.setup.analyzer.rate)
        for i, e in enumerate(an.events):
            if e["frame"] < upto and (call.call_id, i) not in an.taken:
                an.taken.add((call.call_id, i))
                if e["frame"] >= call.call_start_frame or (
                        e["kind"] in ("callerid", "tone") and e["frame"] >= call.call_start_frame - window):
                    call.add(e)

    def _detect(self, stream: StreamState, line: LineState, start: int, raw: np.ndarray,
                block: np.ndarray, seq: int | None, an: Analysis,
                whole: tuple[int, np.ndarray]) -> None:
        """Call detection on ``raw`` (frames from ``start``), a piece of the line's ``whole``
        block (its first frame and raw audio; ``seq`` is its first record)."""
        events = line.detector.process(start, raw)
        end = start + len(block)
        pos = start
        for ev in events:
            if ev.kind == CALL_START and line.call is not None and line.call.resumed is not None:
                wait = line.call.resumed
                if ev.frame - (wait["at_frame"] + wait["frames"]) < line.setup.stop_delay_s * stream.rate:
                    self._continue_call(stream, line, start, seq)
                    pos = start
                    continue
                # Voice only after the stop delay (a large batch holds both): the stopped call
                # ended while the box was down, and this is a new call.
                self._end_stopped_call(line)
            if ev.kind == CALL_START:
                if not self.outbox.accepting_new_calls():
                    self._refuse_call(stream, line, ev.frame)
                    continue
                self._start_call(stream, line, ev.frame, start, seq, an, whole)
                pos = max(ev.frame, start)
            elif line.call is not None and line.spool is not None:
                if ev.frame > pos:
                    self._take_events(line, an, ev.frame)
                    self._append(line, block[pos - start:ev.frame - start])
                self._end_call(line, ev, pos, an)
                pos = end
        if line.call is not None and line.call.resumed is None:
            self._take_events(line, an, end)
            self._append(line, block[pos - start:])
        elif line.call is not None and line.detector.idle:
            note = line.call.resumed
            assert note is not None and line.spool is not None
            if end - (note["at_frame"] + note["frames"]) >= line.setup.stop_delay_s * stream.rate:
                self._end_stopped_call(line)

    def _end_stopped_call(self, line: LineState) -> None:
        """No voice within the stop delay after the restart: the call ended while the box was
        down. Its held-back tail is its last part, with the downtime's gap note."""
        assert line.call is not None and line.spool is not None
        self._close_call(line, line.call.part_start_frame + line.spool.frames)

    def _end_call(self, line: LineState, ev: DetectorEvent, pos: int, an: Analysis) -> None:
        assert line.call is not None and line.spool is not None
        if ev.frame <= pos:
            line.spool.cut(max(ev.frame - line.call.part_start_frame, 0))
        if ev.kind == "call_end" or line.call.part > 0:
            # A call with sealed parts is never discarded (e.g. continued after a stop).
            self._take_events(line, an, ev.frame)
            line.call.drop_from(ev.frame)
            self._close_call(line, ev.frame)
        else:
            line.analyzer.end_pause(ev.frame)
            self._retired.append(line.spool)
            line.call, line.spool = None, None

    def _close_call(self, line: LineState, end: int) -> None:
        """The open call ends at ``end``: its last part is sealed with the record."""
        assert line.call is not None and line.spool is not None
        if line.call.resumed is not None:  # it ended while the box was stopped
            line.call.gaps.append(line.call.resumed)
            line.call.resumed = None
        pause = line.analyzer.end_pause(end)
        if pause is not None:
            line.call.add(pause)
        self._pending.append(PendingSeal(line, line.call, line.spool, line.spool.frames,
                                         last=True, events=line.call.events))
        line.call, line.spool = None, None

    def _new_spool(self, line: str) -> Spool:
        self.spool_gen += 1
        spool = Spool(self.spool_dir, line, self.spool_gen)
        spool.truncate(0)
        return spool

    def _refuse_call(self, stream: StreamState, line: LineState, first: int) -> None:
        """Disk-full policy 'stop-new-calls': the call is not recorded, and never silently."""
        note = {"reason": "call not recorded: outbox full (stop-new-calls)", "line": line.line,
                "at_frame": first, "stream": stream.section.name}
        log.error("line %s: call at frame %d NOT recorded: the outbox is full", line.line, first)
        self._alarm("call-not-recorded", line=line.line, at_frame=first)
        # Announced in the next sealed manifest (kept in the checkpoint until then).
        self.unrecorded.append(note)

    def _start_call(self, stream: StreamState, line: LineState, first: int, block_start: int,
                    seq: int | None, an: Analysis, whole: tuple[int, np.ndarray]) -> None:
        # Pre-roll: from the journal before the whole block, then the block up to this piece.
        whole_start, whole_raw = whole
        history, first = self._history(stream, line.channel, first, whole_start, seq)
        if block_start > whole_start:
            lo = max(first, whole_start)
            history = np.concatenate((history, whole_raw[lo - whole_start:block_start - whole_start]))
            first = min(first, lo)
        digest = hashlib.sha256(
            f"{self.cfg.device.id}|{stream.section.name}|{line.line}|{first}".encode()
        ).hexdigest()[:6]
        stamp = datetime.fromtimestamp(stream.wall_ns(first) / 1e9, UTC).strftime("%Y%m%dT%H%M%SZ")
        line.call = OpenCall(call_id=f"{line.line}-{stamp}-{digest}", call_start_frame=first,
                             part=0, part_start_frame=first)
        line.spool = self._new_spool(line.line)
        line.spool.append(line.analyzer.mask(history, first))
        window = round(INBOUND_WINDOW_S * stream.rate)
        this_block = {id(e) for e in an.events}  # taken by their frames as the audio is spooled
        for e in line.analyzer.recent:
            early_ok = e["kind"] in ("callerid", "tone") and e["frame"] >= first - window
            if id(e) not in this_block and (e["frame"] >= first or early_ok):
                line.call.add(e)
        if line.analyzer.paused_since is not None and line.analyzer.paused_since < first:
            line.analyzer.paused_since = first
        self.calls_started += 1

    def _history(self, stream: StreamState, channel: int, first: int, block_start: int,
                 seq: int | None) -> tuple[np.ndarray, int]:
        """Pre-roll: the journal's audio from ``first`` up to ``block_start``."""
        if first >= block_start or seq is None:
            return np.zeros(0, dtype=np.int16), max(first, block_start)
        out = np.zeros(block_start - first, dtype=np.int16)
        earliest = block_start
        s = seq - 1
        while earliest > first and s >= 0:
            rec = stream.reader.get(s) if stream.reader is not None else None
            if rec is None or rec.frame_pos + rec.frames != earliest:  # only contiguous audio
                break
            pcm = np.frombuffer(rec.payload, dtype="<i2").reshape(rec.frames, rec.channels)
            lo = max(rec.frame_pos, first)
            out[lo - first:rec.frame_pos + rec.frames - first] = pcm[lo - rec.frame_pos:, channel]
            earliest = lo
            s -= 1
        return out[earliest - first:], earliest

    def _append(self, line: LineState, samples: np.ndarray) -> None:
        assert line.call is not None and line.spool is not None
        line.spool.append(samples)
        part_frames = int(line.setup.max_segment_s * self._rate_of(line))
        hold = int((line.setup.stop_delay_s + 1.0) * self._rate_of(line))
        while line.spool.frames >= part_frames + hold:
            # Cut a full part; the rest moves to a fresh spool (a call end can still trim it).
            self._cut_part(line, part_frames)

    def _cut_part(self, line: LineState, frames: int) -> None:
        """The first ``frames`` of the open part are sealed (not as the last part) with this
        record; the call goes on in a fresh spool with the rest."""
        assert line.call is not None and line.spool is not None
        old, call = line.spool, line.call
        rest = old.read(frames)
        before = call.split(call.part_start_frame + frames)
        if line.analyzer.paused_since is not None:  # a pause window still open
            before.append({"kind": "pause", "frame": line.analyzer.paused_since, "end": None,
                           "by": line.analyzer.paused_by})
        self._pending.append(PendingSeal(line, call.copy(), old, frames, last=False,
                                         events=before))
        call.part += 1
        call.part_start_frame += frames
        call.gaps = []
        line.spool = self._new_spool(line.line)
        line.spool.append(rest)

    def _rate_of(self, line: LineState) -> int:
        for s in self.streams:
            if line in s.lines:
                return s.rate
        raise LookupError(line.line)

    def _stream_of(self, line: LineState) -> StreamState:
        for s in self.streams:
            if line in s.lines:
                return s
        raise LookupError(line.line)

    @property
    def next_key_path(self) -> Path:
        return self.cfg.keys_dir / NEXT_KEY_FILE

    def _rotation_candidate(self) -> DeviceKey | None:
        if self.rotation is not None or not self.next_key_path.exists():
            return None
        return DeviceKey.load(self.next_key_path)

    def _finish_rotation(self) -> None:
        """After the announcing segment is committed, the new key replaces the old one."""
        if self.rotation is None:
            return
        if self.next_key_path.exists():
            new_key = DeviceKey.load(self.next_key_path)
            if new_key.key_id == self.rotation["key_id"]:
                os.replace(self.next_key_path, self.cfg.keys_dir / "device.key")
                # Durability: the switch to the new signing key survives a power cut.
                fsync_dir(self.cfg.keys_dir)
                self.key = new_key
                log.info("signing key rotated to %s (announced in segment %d)",
                         new_key.key_id, self.rotation["seq"])
        self.rotation = None
        self.checkpoint()

    def _seal_pending(self) -> None:
        pending, self._pending = self._pending, []
        prepared: list[int] = []
        next_key = self._rotation_candidate()
        signing = self.key
        # Segments the outbox had to drop, and calls it made us skip, are announced in the
        # first manifest sealed from now on: central sees every loss in the chain.
        announce = self.outbox.pending_losses() + list(self.unrecorded)
        announced: list[dict[str, Any]] = []
        orphan_notes: list[dict[str, Any]] = []
        for p in pending:
            stream = self._stream_of(p.line)
            if p.frames <= 0:
                # No audio to seal, but the losses noted for it still reach central.
                orphan_notes += [{**g, "line": p.line.line} for g in p.call.gaps]
                continue
            pcm = p.spool.read(0, p.frames)
            start = p.call.part_start_frame
            sensitive, notes = part_meta(p.call, p.events, start, p.frames, stream.rate,
                                         last=p.last)
            sensitive, gaps = avoid_leaks(sensitive, list(p.call.gaps), notes)
            if announce:
                gaps, announced, announce = gaps + announce, announce, []
                self.unrecorded = []
            seg = seal_segment(
                SegmentInput(line=p.line.line, call_id=p.call.call_id, part=p.call.part,
                             last_part=p.last, start_frame=start,
                             start_wall_ns=stream.wall_ns(start), rate=stream.rate, pcm=pcm,
                             sensitive=sensitive, gaps=gaps),
                device_id=self.cfg.device.id, seq=self.next_seq,
                prev_manifest_sha256=self.prev_hash, recipients=self.recipients, key=signing,
                codec=self.cfg.seal.codec, opus_bitrate=self.cfg.seal.opus_bitrate,
                opus_complexity=self.cfg.seal.opus_complexity, next_key=next_key,
            )
            if next_key is not None:
                # The old key signs the announcement of the new one: the chain stays verifiable.
                self.rotation = {"key_id": next_key.key_id, "seq": seg.seq}
                # Segments sealed with it in this batch follow the announcement: the new key
                # signs them (they are committed, or discarded, together with it).
                signing, next_key = next_key, None
            # Phase 1: the sealed segment is durable but not yet visible to the uplink.
            self.outbox.prepare(seg.seq, encode_wire(seg), seg.payload_sha256)
            prepared.append(seg.seq)
            self.next_seq += 1
            self.prev_hash = seg.manifest_sha256
            self.sealed += 1
            log.info("sealed segment %d: line %s call %s part %d (%d frames%s)", seg.seq,
                     p.line.line, p.call.call_id, p.call.part, p.frames, ", last" if p.last else "")
        self.unrecorded += orphan_notes
        # Phase 2: the checkpoint moves next_seq past the prepared segments.
        self.checkpoint()
        # Phase 3: publish them, then drop the spools they came from.
        for seq in prepared:
            self.outbox.commit(seq)
        lost = [g["lost_seq"][1] for g in announced if "lost_seq" in g] if prepared else []
        if lost:
            self.outbox.clear_losses(max(lost))
        for p in pending:
            p.spool.remove()
        self._finish_rotation()

    def seal_open_parts(self) -> None:
        """Clean stop: each open call's audio so far is sealed as a part (not its last), through
        the usual commit with the outbox, so it reaches central while the box is down. A tail
        of stop delay + 1 s stays in the durable spool, as at a max_segment_s cut: it becomes
        the call's last part if the call turns out to have ended, so no call is left without
        one. The next start continues the calls (``_resume_after_stop``)."""
        for stream in self.streams:
            for line in stream.lines:
                if line.call is None or line.spool is None:
                    continue
                if line.call.resumed is not None:  # stopped again before the call showed up
                    self._end_stopped_call(line)
                    continue
                hold = int((line.setup.stop_delay_s + 1.0) * stream.rate)
                if line.spool.frames > hold:
                    self._cut_part(line, line.spool.frames - hold)
            stream.stopped_at = stream.expect_frame
        if self._pending:
            self._seal_pending()
        else:
            self.checkpoint()
        log.info("stopped: open calls sealed, next segment %d", self.next_seq)

    # -- loop -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lines = [
            {
                "line": ln.line,
                "stream": s.section.name,
                "in_call": ln.call is not None,
                "call_id": ln.call.call_id if ln.call else None,
                "level_db": round(ln.detector.level_db, 1),
                "paused": ln.analyzer.paused_since is not None,
                "masking": ln.setup.analyzer.masking,
                **ln.health.report(ln.detector.noise_floor_db),
            }
            for s in self.streams
            for ln in s.lines
        ]
        return {"ts": time.time(), "pid": os.getpid(), "lines": lines, "sealed": self.sealed,
                "calls_started": self.calls_started, "next_seq": self.next_seq,
                "caught_up": self.caught_up, "alarms": list(self.alarms),
                "cursors": {s.section.name: s.cursor for s in self.streams}}

    def run(self, stop: threading.Event, status_path: Path | None = None) -> None:
        interval = self.cfg.recorder.read_interval_s
        next_read = time.monotonic()
        try:
            while not stop.is_set():
                # Keep-alives and the status file go out from this loop, between reads too:
                # analysis stuck in step() stops both.
                sdnotify.notifier().watchdog()
                now = time.monotonic()
                if status_path is not None and now - self._last_status >= STATUS_EVERY_S:
                    write_status(status_path, self.status())
                    self._last_status = now
                if now < next_read:
                    stop.wait(sdnotify.notifier().max_wait(min(next_read - now, STATUS_EVERY_S)))
                    continue
                handled = self.step()
                self.caught_up = handled == 0  # the journal held nothing new at this read
                # Behind (a batch was full): read on at once. Otherwise read again after
                # read_interval_s: a recorder needs no low latency, and one read per second of
                # audio costs a fraction of what fifty 20 ms reads cost.
                next_read = now if handled >= MAX_BATCH else max(next_read + interval, now)
            # After a failure there is no consistent instant to save: the restart resumes from
            # the last checkpoint, as after a crash.
            self.seal_open_parts()
        finally:
            if status_path is not None:
                write_status(status_path, self.status())
