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

from appliance.buffer import Flags, Gap, Record, RingReader
from appliance.config import CaptureSection, Config
from appliance.durable import atomic_write_json, fsync_dir, write_status
from appliance.errors import ApplianceError, ConfigError, FormatError
from appliance.recorder.detect import CallDetector, DetectorConfig
from appliance.recorder.spool import Spool, remove_unreferenced
from appliance.seal import FIRST_SEQ, DeviceKey, SegmentInput, decode_wire, encode_wire, seal_segment
from appliance.sync.outbox import Outbox

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_FILLED_GAP_S = 10.0
MAX_BATCH = 256
MAX_ALARMS = 20
NEXT_KEY_FILE = "device.next.key"
REOPEN_CHECK_S = 1.0


@dataclass
class OpenCall:
    call_id: str
    call_start_frame: int
    part: int
    part_start_frame: int
    gaps: list[dict[str, Any]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LineState:
    line: str
    channel: int
    detector: CallDetector
    call: OpenCall | None = None
    spool: Spool | None = None


@dataclass
class PendingSeal:
    """A finished part waiting for the end of the record being processed."""

    line: LineState
    call: OpenCall
    spool: Spool
    frames: int
    last: bool


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

    def wall_ns(self, frame: int) -> int:
        anchor_frame, anchor_wall = self.anchor
        return anchor_wall + (frame - anchor_frame) * 1_000_000_000 // max(self.rate, 1)


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
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.outbox = Outbox(cfg.outbox_dir)
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
        det_cfg = self._detector_config(stream.rate)
        for ln in st["lines"]:
            line = LineState(line=ln["line"], channel=ln["channel"],
                             detector=CallDetector.from_state(det_cfg, ln["detector"]))
            if ln["call"] is not None:
                line.call = OpenCall(**ln["call"])
                line.spool = Spool(self.spool_dir, line.line, ln["spool_gen"])
                # Frames appended after the checkpoint are read from the journal again.
                line.spool.truncate(ln["spool_frames"])
            stream.lines.append(line)

    # -- checkpoint -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        streams = {}
        for s in self.streams:
            streams[s.section.name] = {
                "cursor": s.cursor,
                "expect_frame": s.expect_frame,
                "rate": s.rate,
                "anchor": list(s.anchor),
                "lines": [
                    {
                        "line": ln.line,
                        "channel": ln.channel,
                        "detector": ln.detector.to_state(),
                        "call": ln.call.to_state() if ln.call else None,
                        "spool_gen": ln.spool.gen if ln.spool else None,
                        "spool_frames": ln.spool.frames if ln.spool else 0,
                    }
                    for ln in s.lines
                ],
            }
        return {
            "v": STATE_VERSION,
            "next_seq": self.next_seq,
            "prev_manifest_sha256": self.prev_hash,
            "spool_gen": self.spool_gen,
            "rotation": self.rotation,
            "streams": streams,
        }

    def checkpoint(self) -> None:
        for s in self.streams:
            for ln in s.lines:
                if ln.spool is not None:
                    ln.spool.sync()
        # Durability: this file is the recorder's commit point (cursor, detectors, next_seq).
        atomic_write_json(self.state_path, self._state())
        self._last_checkpoint = time.monotonic()

    # -- processing -------------------------------------------------------------------------

    def _detector_config(self, rate: int) -> DetectorConfig:
        r = self.cfg.recorder
        return DetectorConfig(
            rate=rate,
            threshold_db=r.threshold_db,
            min_level_dbfs=r.min_level_dbfs,
            start_debounce_ms=r.start_debounce_ms,
            stop_delay_s=r.stop_delay_s,
            pre_roll_s=r.pre_roll_s,
            min_call_s=r.min_call_s,
            max_segment_s=r.max_segment_s,
        )

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
            self._handle_gap(stream, stream.expect_frame, lost, reason)
        stream.gap_reason = "lost"
        stream.anchor = (first.frame_pos, first.wall_ns)
        payload = b"".join(r.payload for r in batch)
        frames = last.frame_pos + last.frames - first.frame_pos
        pcm = np.frombuffer(payload, dtype="<i2").reshape(frames, first.channels)
        for line in stream.lines:
            self._process_line(stream, line, first.frame_pos, pcm[:, line.channel], first.seq)
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
        det_cfg = self._detector_config(rec.rate)
        stream.lines = [LineState(line=lid, channel=i, detector=CallDetector(det_cfg))
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
        det_cfg = self._detector_config(stream.rate)
        for line in stream.lines:
            if line.call is not None and line.spool is not None:
                line.call.gaps.append(note)
                self._pending.append(PendingSeal(line, line.call, line.spool,
                                                 line.spool.frames, last=True))
                line.call, line.spool = None, None
            line.detector = CallDetector(det_cfg)

    def _process_line(self, stream: StreamState, line: LineState, start: int,
                      block: np.ndarray, seq: int | None) -> None:
        events = line.detector.process(start, block)
        end = start + len(block)
        pos = start
        for ev in events:
            if ev.kind == "call_start":
                self._start_call(stream, line, ev.frame, start, seq)
                pos = max(ev.frame, start)
            elif line.call is not None and line.spool is not None:
                if ev.frame > pos:
                    self._append(line, block[pos - start:ev.frame - start])
                else:
                    line.spool.truncate(max(ev.frame - line.call.part_start_frame, 0))
                if ev.kind == "call_end":
                    self._pending.append(PendingSeal(line, line.call, line.spool,
                                                     line.spool.frames, last=True))
                else:
                    line.spool.remove()
                line.call, line.spool = None, None
                pos = end
        if line.call is not None:
            self._append(line, block[pos - start:])

    def _new_spool(self, line: str) -> Spool:
        self.spool_gen += 1
        spool = Spool(self.spool_dir, line, self.spool_gen)
        spool.truncate(0)
        return spool

    def _start_call(self, stream: StreamState, line: LineState, first: int, block_start: int,
                    seq: int | None) -> None:
        history, first = self._history(stream, line.channel, first, block_start, seq)
        digest = hashlib.sha256(
            f"{self.cfg.device.id}|{stream.section.name}|{line.line}|{first}".encode()
        ).hexdigest()[:6]
        stamp = datetime.fromtimestamp(stream.wall_ns(first) / 1e9, UTC).strftime("%Y%m%dT%H%M%SZ")
        line.call = OpenCall(call_id=f"{line.line}-{stamp}-{digest}", call_start_frame=first,
                             part=0, part_start_frame=first)
        line.spool = self._new_spool(line.line)
        line.spool.append(history)
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
            if rec is None or rec.frame_pos + rec.frames > earliest:
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
        part_frames = int(self.cfg.recorder.max_segment_s * self._rate_of(line))
        hold = int((self.cfg.recorder.stop_delay_s + 1.0) * self._rate_of(line))
        while line.spool.frames >= part_frames + hold:
            # Cut a full part; the rest moves to a fresh spool (a call end can still trim it).
            old, call = line.spool, line.call
            rest = old.read(part_frames)
            self._pending.append(PendingSeal(line, OpenCall(**call.to_state()), old,
                                             part_frames, last=False))
            call.part += 1
            call.part_start_frame += part_frames
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
        for p in pending:
            stream = self._stream_of(p.line)
            if p.frames <= 0:
                p.spool.remove()
                continue
            pcm = p.spool.read(0, p.frames)
            start = p.call.part_start_frame
            seg = seal_segment(
                SegmentInput(line=p.line.line, call_id=p.call.call_id, part=p.call.part,
                             last_part=p.last, start_frame=start,
                             start_wall_ns=stream.wall_ns(start), rate=stream.rate, pcm=pcm,
                             sensitive={}, gaps=list(p.call.gaps)),
                device_id=self.cfg.device.id, seq=self.next_seq,
                prev_manifest_sha256=self.prev_hash, recipients=self.recipients, key=self.key,
                codec=self.cfg.seal.codec, opus_bitrate=self.cfg.seal.opus_bitrate,
                next_key=next_key,
            )
            if next_key is not None:
                # The old key signs the announcement of the new one: the chain stays verifiable.
                self.rotation = {"key_id": next_key.key_id, "seq": seg.seq}
                next_key = None
            # Phase 1: the sealed segment is durable but not yet visible to the uplink.
            self.outbox.prepare(seg.seq, encode_wire(seg), seg.payload_sha256)
            prepared.append(seg.seq)
            self.next_seq += 1
            self.prev_hash = seg.manifest_sha256
            self.sealed += 1
            log.info("sealed segment %d: line %s call %s part %d (%d frames%s)", seg.seq,
                     p.line.line, p.call.call_id, p.call.part, p.frames, ", last" if p.last else "")
        # Phase 2: the checkpoint moves next_seq past the prepared segments.
        self.checkpoint()
        # Phase 3: publish them, then drop the spools they came from.
        for seq in prepared:
            self.outbox.commit(seq)
        for p in pending:
            p.spool.remove()
        self._finish_rotation()

    # -- loop -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lines = [
            {
                "line": ln.line,
                "stream": s.section.name,
                "in_call": ln.call is not None,
                "call_id": ln.call.call_id if ln.call else None,
                "level_db": round(ln.detector.level_db, 1),
                "noise_floor_db": round(ln.detector.noise_floor_db, 1),
            }
            for s in self.streams
            for ln in s.lines
        ]
        return {"ts": time.time(), "lines": lines, "sealed": self.sealed,
                "calls_started": self.calls_started, "next_seq": self.next_seq,
                "caught_up": self.caught_up, "alarms": list(self.alarms),
                "cursors": {s.section.name: s.cursor for s in self.streams}}

    def run(self, stop: threading.Event, status_path: Path | None = None) -> None:
        try:
            while not stop.is_set():
                handled = self.step()
                self.caught_up = handled == 0
                now = time.monotonic()
                if status_path is not None and now - self._last_status >= 0.5:
                    write_status(status_path, self.status())
                    self._last_status = now
                if not handled:
                    stop.wait(0.02)
        finally:
            self.checkpoint()
            if status_path is not None:
                write_status(status_path, self.status())
