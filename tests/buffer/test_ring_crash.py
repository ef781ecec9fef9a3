"""Crash-consistency checker for the ring journal, in the spirit of ALICE and CrashMonkey.

The writer runs on an in-memory file whose writes and fdatasyncs are logged (ring_memio.MemIO).
A crash state is: every write up to the last completed sync, plus any subset of the later
(unsynced) writes, each possibly torn at 512-byte sector boundaries with the unwritten sectors
left old, zeroed or filled with garbage. On each state we run recovery (RingWriter.open) and a
RingReader scan and check the ring's promises:

1. every record returned is byte-identical to one that was written with that seq, in seq order,
   without duplicates;
2. every record written before the last completed sync is returned, unless a later write that made
   it into the crash state touched its slot (or the ring has moved a full lap past it);
3. recovery never raises, never loops (reads are budgeted), finds the newest valid record and never
   hands out a seq that a valid record on disk already has.

Each scenario runs two phases: the second starts from a random crash state of the first, so holes
and torn slots left by an earlier crash are part of what later crashes see.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.buffer import Flags, Gap, Record, RingReader, RingWriter, SampleFormat, recovery
from appliance.buffer.format import FILE_HEADER_SIZE, FileHeader, decode_file_header, decode_record

from .ring_memio import MemIO, Sync, Write

RING = Path("/mem/ring.j")
SLOT = 4096
SECTOR = 512
READ_BUDGET = 4000


@dataclass
class Phase:
    base: bytes
    log: list[Write | Sync]
    write_seq: dict[int, int]  # log index of a record write -> its seq


def _append(rng: random.Random, w: RingWriter, state: dict[str, int]) -> Record:
    channels = rng.choice([1, 2])
    frames = rng.choice([1, 7, 100, 250, w.max_payload // (2 * channels)])
    gap = rng.random() < 0.1
    gap_frames = rng.randrange(1, 50) if gap else 0
    frame_pos = state["frame_pos"] + gap_frames
    payload = rng.randbytes(frames * channels * 2)
    mono, wall = rng.randrange(1 << 40), rng.randrange(1 << 60)
    seq = w.append(
        payload, frames=frames, channels=channels, rate=8000, sample_format=SampleFormat.S16_LE,
        frame_pos=frame_pos, flags=Flags.GAP if gap else Flags.NONE, gap_frames=gap_frames,
        mono_ns=mono, wall_ns=wall,
    )
    state["frame_pos"] = frame_pos + frames
    return Record(
        stream_id=7, seq=seq, boot_id=w.boot_id, mono_ns=mono, wall_ns=wall, frame_pos=frame_pos,
        frames=frames, channels=channels, sample_format=SampleFormat.S16_LE, rate=8000,
        flags=Flags.GAP if gap else Flags.NONE, gap_frames=gap_frames, payload=payload,
    )


def _open(io: MemIO, slots: int, interval: float) -> RingWriter:
    return RingWriter.open(
        RING, stream_id=7, size_bytes=FILE_HEADER_SIZE + slots * SLOT, slot_size=SLOT,
        sync_interval_s=interval, io=io,
    )


def _run_phase(
    rng: random.Random, base: bytes | None, slots: int, appends: int, interval: float,
    written: dict[int, Record],
) -> Phase:
    """Run the writer (create or recover, append, sometimes sync or reopen) and log its I/O."""
    io = MemIO()
    if base is not None:
        io.files[str(RING)] = bytearray(base)
    w = _open(io, slots, interval)
    for seq in [s for s in written if s >= w.next_seq]:
        del written[seq]  # never valid on disk (checked below), so the seq may be handed out again
    image = bytes(io.files[str(RING)])
    io.log.clear()
    write_seq: dict[int, int] = {}
    state = {"frame_pos": rng.randrange(1000)}
    for _ in range(appends):
        io.now += rng.uniform(0.05, 0.5)
        before = len(io.log)
        rec = _append(rng, w, state)
        assert rec.seq not in written, f"seq {rec.seq} handed out twice"
        written[rec.seq] = rec
        write_seq[next(i for i in range(before, len(io.log)) if isinstance(io.log[i], Write))] = (
            rec.seq
        )
        roll = rng.random()
        if roll < 0.05:
            w.sync()
        elif roll < 0.08:
            w.close()
            w = _open(io, slots, interval)
    return Phase(base=image, log=list(io.log), write_seq=write_seq)


def _tear(rng: random.Random, img: bytearray, wr: Write) -> bool:
    """Apply ``wr`` to ``img`` fully or torn; True when it was applied fully."""
    end = wr.offset + len(wr.data)
    sectors = list(range(wr.offset // SECTOR * SECTOR, end, SECTOR))
    mode = rng.random()
    if mode < 0.4 or len(sectors) == 1 and mode < 0.7:
        img[wr.offset : end] = wr.data
        return True
    if mode < 0.7:
        keep = set(sectors[: rng.randrange(len(sectors))])
    else:
        keep = {s for s in sectors if rng.random() < 0.5}
    fill = rng.choice(["old", "zero", "garbage"])
    for s in sectors:
        lo, hi = max(s, wr.offset), min(s + SECTOR, end)
        if s in keep:
            img[lo:hi] = wr.data[lo - wr.offset : hi - wr.offset]
        elif fill == "zero":
            img[lo:hi] = bytes(hi - lo)
        elif fill == "garbage":
            img[lo:hi] = rng.randbytes(hi - lo)
    return len(keep) == len(sectors)


def _valid_on_disk(img: bytes, geo: FileHeader) -> dict[int, Record]:
    out: dict[int, Record] = {}
    for slot in range(geo.slot_count):
        off = geo.slot_offset(slot)
        rec = decode_record(img[off : off + geo.slot_size], geo, slot)
        if rec is not None:
            out[slot] = rec
    return out


def _crash_states(rng: random.Random, phase: Phase, per_point: int):  # type: ignore[no-untyped-def]
    """Yield (image, required slots' seqs, description) for crash states of a phase."""
    synced = bytearray(phase.base)
    synced_upto = -1  # log index of the last sync
    for k, ev in enumerate(phase.log):
        if isinstance(ev, Sync):
            for i in range(synced_upto + 1, k):
                e = phase.log[i]
                if isinstance(e, Write):
                    synced[e.offset : e.offset + len(e.data)] = e.data
            synced_upto = k
        pending = [i for i in range(synced_upto + 1, k + 1) if isinstance(phase.log[i], Write)]
        if len(pending) <= 3:
            subsets = [
                list(c) for r in range(len(pending) + 1) for c in itertools.combinations(pending, r)
            ]
        else:
            subsets = [pending, []]
        while len(subsets) < per_point:
            subsets.append([i for i in pending if rng.random() < 0.5])
        for subset in subsets[:per_point]:
            img = bytearray(synced)
            # slot -> (seq of the last write that touched it, applied fully and durable?)
            touched: dict[int, tuple[int | None, bool]] = {}
            for i in range(0, synced_upto + 1):
                e = phase.log[i]
                if isinstance(e, Write) and e.offset >= FILE_HEADER_SIZE:
                    touched[(e.offset - FILE_HEADER_SIZE) // SLOT] = (phase.write_seq.get(i), True)
            for i in subset:
                e = phase.log[i]
                assert isinstance(e, Write)
                full = _tear(rng, img, e)
                # Applied but not synced: its slot no longer has to hold anything durable.
                touched[(e.offset - FILE_HEADER_SIZE) // SLOT] = (None, full)
            yield bytes(img), touched, f"crash after log event {k}, unsynced writes {subset}"


def _check_state(
    img: bytes, touched: dict[int, tuple[int | None, bool]], base_valid: dict[int, Record],
    written: dict[int, Record], slots: int, interval: float,
) -> list[str]:
    """All promise violations found in one crash state."""
    bad: list[str] = []
    geo = decode_file_header(img, "crash image")
    on_disk = _valid_on_disk(img, geo)
    newest = max((r.seq for r in on_disk.values()), default=None)
    io = MemIO({str(RING): bytearray(img)})
    io.read_budget = READ_BUDGET
    try:
        w = _open(io, slots, interval)
        reader = RingReader(RING, io=io)
        items: list[Record | Gap] = []
        for _ in range(4 * slots):
            batch = reader.poll(16)
            if not batch:
                break
            items.extend(batch)
    except Exception as err:  # noqa: BLE001 - any exception is a violation of promise 3
        return [f"recovery raised {type(err).__name__}: {err}"]
    if w.recovery_note is not None:
        bad.append(f"synced journal moved aside: {w.recovery_note}")
    if newest is not None and w.next_seq != newest + 1:
        bad.append(f"writer resumes at {w.next_seq}, newest valid record on disk is {newest}")
    records = [it for it in items if isinstance(it, Record)]
    seqs = [r.seq for r in records]
    if seqs != sorted(set(seqs)):
        bad.append(f"records out of order or duplicated: {seqs}")
    bad += [f"record {r.seq} differs from the one written" for r in records
            if written.get(r.seq) != r]
    bad += [f"unexpected gap {g}" for g in items
            if isinstance(g, Gap) and (g.reason != "corrupt" or g.first_seq > g.last_seq)]
    got = set(seqs)
    floor = -1 if newest is None else newest - slots
    for slot in range(slots):
        if slot in touched:
            seq, durable_full = touched[slot]
            need = seq if durable_full else None
        else:
            rec = base_valid.get(slot)
            need = None if rec is None else rec.seq
        if need is not None and need > floor and need not in got:
            bad.append(f"synced record {need} (slot {slot}) lost")
    return bad


@dataclass
class Scenario:
    seed: int
    slots: int
    window: int | None
    interval: float
    appends: int
    per_point: int


SCENARIOS = [
    Scenario(seed=1, slots=16, window=None, interval=1.0, appends=60, per_point=17),
    Scenario(seed=2, slots=16, window=None, interval=0.6, appends=60, per_point=17),
    # A ring larger than the local scan window, so the binary search has to do the work.
    Scenario(seed=3, slots=48, window=12, interval=1.0, appends=70, per_point=15),
    Scenario(seed=4, slots=40, window=12, interval=0.4, appends=70, per_point=15),
]


def test_crash_states_recover(monkeypatch: pytest.MonkeyPatch, ring_summary: list[str]) -> None:
    total = 0
    violations: list[str] = []
    for sc in SCENARIOS:
        monkeypatch.setattr(recovery, "SCAN_WINDOW", sc.window or recovery.SCAN_WINDOW)
        rng = random.Random(sc.seed)
        written: dict[int, Record] = {}
        base: bytes | None = None
        for phase_no in range(2):
            phase = _run_phase(rng, base, sc.slots, sc.appends, sc.interval, written)
            geo = decode_file_header(phase.base, "base")
            base_valid = _valid_on_disk(phase.base, geo)
            states = list(_crash_states(rng, phase, sc.per_point))
            for img, touched, desc in states:
                total += 1
                found = _check_state(img, touched, base_valid, written, sc.slots, sc.interval)
                violations += [f"seed {sc.seed} phase {phase_no} {desc}: {v}" for v in found]
            # The next phase starts from a crash state late in this one (holes and torn slots).
            base = rng.choice(states[-len(states) // 4 :])[0]
    summary = f"crash states checked: {total}, violations: {len(violations)}"
    print(summary)
    ring_summary.append(summary)
    assert not violations, "\n".join(violations[:20])
    assert total >= 10_000
