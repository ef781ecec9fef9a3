"""The durable outbox: two-phase publish, acknowledgement, rejection, numbering, crashes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.sync.outbox import Outbox, OutboxError
from linerec_contract.errors import FormatError

from .helpers import add_segment, sha


def test_prepared_is_not_pending_until_commit(outbox: Outbox) -> None:
    blob = os.urandom(1000)
    outbox.prepare(1, blob, sha(blob))
    assert outbox.prepared() == [1]
    assert outbox.pending() == []
    assert outbox.backlog().segments == 0
    assert outbox.highest_seq() == 1  # a prepared number is taken
    outbox.commit(1)
    assert outbox.prepared() == []
    assert outbox.pending() == [1]
    assert outbox.read(1) == blob
    assert outbox.sha256_of(1) == sha(blob)
    assert (outbox.path / "seg-000000000001.seg").read_bytes() == blob  # file = the wire blob
    backlog = outbox.backlog()
    assert (backlog.segments, backlog.bytes) == (1, 1000)
    assert backlog.oldest_age_s >= 0.0


def test_discard_prepared(outbox: Outbox) -> None:
    outbox.prepare(3, b"abc", sha(b"abc"))
    outbox.discard_prepared(3)
    assert outbox.prepared() == [] and outbox.pending() == []
    assert outbox.highest_seq() is None
    assert sorted(p.name for p in outbox.path.iterdir()) == ["rejected"]
    with pytest.raises(OutboxError, match="not prepared"):
        outbox.commit(3)


def test_ack_with_wrong_sha_keeps_the_file(outbox: Outbox) -> None:
    add_segment(outbox, 5, b"payload")
    assert outbox.acknowledge(5, "0" * 64) is False
    assert outbox.pending() == [5]
    assert outbox.acknowledge(6, sha(b"payload")) is False  # unknown number
    assert outbox.acknowledge(5, sha(b"payload")) is True
    assert outbox.pending() == []
    assert outbox.acknowledge(5, sha(b"payload")) is False  # second ack: nothing left
    assert sorted(p.name for p in outbox.path.iterdir()) == ["acked.json", "rejected"]


def test_numbers_are_never_reused_after_drain(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o")
    for seq in (0, 1, 2):
        add_segment(box, seq, bytes([seq]))
    assert box.acknowledge(2, sha(bytes([2])))
    assert box.acknowledge(0, sha(bytes([0])))
    assert box.acknowledge(1, sha(bytes([1])))
    reopened = Outbox(tmp_path / "o")
    assert reopened.pending() == []
    assert reopened.highest_seq() == 2
    assert json.loads((tmp_path / "o" / "acked.json").read_text()) == {"highest_acked": 2}
    with pytest.raises(OutboxError, match="never reused"):
        reopened.prepare(1, b"again", sha(b"again"))
    add_segment(box, 3, b"x")
    with pytest.raises(OutboxError, match="already committed"):
        box.prepare(3, b"y", sha(b"y"))


def test_reject_moves_and_never_deletes(outbox: Outbox) -> None:
    add_segment(outbox, 9, b"bad")
    outbox.reject(9, "signature does not verify")
    assert outbox.pending() == []
    assert outbox.rejected() == [9]
    assert (outbox.rejected_dir / "seg-000000000009.seg").read_bytes() == b"bad"
    reason = json.loads((outbox.rejected_dir / "seg-000000000009.seg.reason.json").read_text())
    assert reason["reason"] == "signature does not verify" and reason["sha256"] == sha(b"bad")
    assert outbox.highest_seq() == 9


def test_bad_input_is_refused_with_a_message(outbox: Outbox) -> None:
    with pytest.raises(FormatError, match="sha256"):
        outbox.prepare(1, b"x", "ABC")
    with pytest.raises(FormatError, match="segment number"):
        outbox.prepare(-1, b"x", sha(b"x"))
    (outbox.path / "acked.json").write_text("[1]")
    with pytest.raises(FormatError, match="highest_acked"):
        outbox.highest_seq()


def test_disk_full_during_prepare_leaves_nothing_visible(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the sidecar is written, the blob hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError) as err:
        outbox.prepare(1, b"x" * 100, sha(b"x" * 100))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert outbox.prepared() == [] and outbox.pending() == []
    assert outbox.highest_seq() is None
    outbox.prepare(1, b"y", sha(b"y"))  # the number is free again and works
    outbox.commit(1)
    assert outbox.sha256_of(1) == sha(b"y")


WRITER = textwrap.dedent("""
    import hashlib, os, sys
    from pathlib import Path
    from appliance.sync.outbox import Outbox
    box = Outbox(Path(sys.argv[1]))
    for p in box.prepared():
        box.discard_prepared(p)
    seq = (box.highest_seq() or 0) + 1
    print("ready", flush=True)
    while True:
        blob = os.urandom(1000 + seq * 37 % 50000)
        box.prepare(seq, blob, hashlib.sha256(blob).hexdigest())
        box.commit(seq)
        for old in box.pending()[:-3]:
            box.acknowledge(old, box.sha256_of(old))
        seq += 1
""")


def test_sigkill_at_any_instant_leaves_a_consistent_outbox(tmp_path: Path) -> None:
    """A real writer process killed with SIGKILL; what is left must check out every time."""
    path = tmp_path / "o"
    seen_highest = -1
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.037 * round_)  # different instants; not a timing assertion
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        box = Outbox(path)
        for seq in box.pending():
            assert sha(box.read(seq)) == box.sha256_of(seq), f"pending {seq} is torn"
        for seq in box.prepared():
            blob = (path / f".seg-{seq:012d}.prep").read_bytes()
            assert sha(blob) == box.sha256_of(seq), f"prepared {seq} is torn"
        assert not set(box.pending()) & set(box.prepared())
        highest = box.highest_seq()
        assert highest is not None and highest >= seen_highest, "numbering went backwards"
        seen_highest = highest
    assert seen_highest > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "ack", "badack", "reject"]),
                          st.integers(0, 5)), max_size=30))
def test_state_machine_invariants(tmp_path_factory: pytest.TempPathFactory,
                                  ops: list[tuple[str, int]]) -> None:
    box = Outbox(tmp_path_factory.mktemp("o"))
    model: dict[int, bytes] = {}
    gone: set[int] = set()
    next_seq = 0
    for op, pick in ops:
        live = sorted(model)
        target = live[pick % len(live)] if live else None
        if op == "add":
            blob = os.urandom(pick + 1)
            add_segment(box, next_seq, blob)
            model[next_seq] = blob
            next_seq += 1
        elif op == "ack" and target is not None:
            assert box.acknowledge(target, sha(model.pop(target)))
            gone.add(target)
        elif op == "badack" and target is not None:
            assert not box.acknowledge(target, sha(model[target] + b"!"))
        elif op == "reject" and target is not None:
            box.reject(target, "test")
            model.pop(target)
            gone.add(target)
        assert box.pending() == sorted(model)
        assert box.highest_seq() == (next_seq - 1 if next_seq else None)
        assert box.backlog().bytes == sum(len(b) for b in model.values())


def test_stray_sidecars_of_acknowledged_numbers_are_removed(outbox: Outbox) -> None:
    add_segment(outbox, 2, b"two")
    assert outbox.acknowledge(2, sha(b"two"))
    # What a crash between the blob's and the sidecar's unlink leaves behind:
    (outbox.path / "seg-000000000001.sha256").write_text(sha(b"one") + "\n")
    # What a crash inside prepare() of a fresh number leaves behind (must stay):
    (outbox.path / "seg-000000000003.sha256").write_text(sha(b"three") + "\n")
    add_segment(outbox, 4, b"four")
    assert outbox.remove_stray_sidecars() == [1]
    assert (outbox.path / "seg-000000000003.sha256").exists()
    assert outbox.sha256_of(4) == sha(b"four")


def test_drop_oldest_records_the_loss_before_deleting(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob", max_bytes=10_000, policy="drop-oldest", reserve_bytes=0)
    for seq in range(4):
        box.prepare(seq, b"x" * 3000, sha(b"x" * 3000))
        box.commit(seq)
    # 12 000 bytes would not fit: the oldest unsent segments go, and the loss is recorded.
    assert box.pending() == [1, 2, 3]
    box.prepare(4, b"y" * 3000, sha(b"y" * 3000))
    box.commit(4)
    assert box.pending() == [2, 3, 4]
    losses = box.pending_losses()
    assert losses == [{"lost_seq": [0, 1], "reason": losses[0]["reason"]}]
    assert "drop-oldest" in losses[0]["reason"]
    assert {a["alarm"] for a in box.alarms()} >= {"segments-dropped", "outbox-quota"}
    # A dropped number is never reused, even once everything else is acknowledged.
    for seq in (2, 3, 4):
        assert box.acknowledge(seq, box.sha256_of(seq))
    again = Outbox(tmp_path / "ob", max_bytes=10_000, policy="drop-oldest", reserve_bytes=0)
    assert again.highest_seq() == 4
    box.clear_losses(0)
    assert box.pending_losses() == losses  # [0, 1] ends above 0: kept
    box.clear_losses(1)
    assert box.pending_losses() == []
    assert "segments-dropped" not in {a["alarm"] for a in box.alarms()}


def test_stop_new_calls_never_deletes_and_says_so(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob", max_bytes=10_000, policy="stop-new-calls", reserve_bytes=0)
    assert box.accepting_new_calls()
    for seq in range(4):
        box.prepare(seq, b"x" * 3000, sha(b"x" * 3000))
        box.commit(seq)
    assert box.pending() == [0, 1, 2, 3]  # calls in progress finish; nothing is dropped
    assert not box.accepting_new_calls()
    assert box.pending_losses() == []
    assert {a["alarm"] for a in box.alarms()} == {"outbox-quota", "new-calls-stopped"}
    for seq in range(3):
        box.acknowledge(seq, box.sha256_of(seq))
    assert box.accepting_new_calls() and box.alarms() == []


def test_quota_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="disk-full policy"):
        Outbox(tmp_path / "ob", policy="panic")  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="quota"):
        Outbox(tmp_path / "ob", max_bytes=0)
