"""Retention with a fake clock (`retention run --now`), legal holds, the signed deletion log and
the audit, over an archive the real recorder made from simulated lines (recorded in Nov 2023)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from central.cli import main
from central.home import Home
from central.receiver import SegmentIntake
from central.retention import deletion_audit, retention_loop
from central.search import find_calls
from central.store import Store
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire
from tests.recorder.recorder_support import outbox_segments, recorder_config

from .central_helpers import Box, known_signal
from .sim_archive import SimArchive, build

POLICY = """
[retention]
days = 30
[retention.groups]
masked = ["box-pci"]
[[retention.rule]]
group = "masked"
days = 3650
[[retention.rule]]
device = "box-pci"
line = "L2"
days = 60
"""


@pytest.fixture()
def arch(tmp_path: Path) -> SimArchive:
    return build(tmp_path)


def run(arch: SimArchive, *args: str) -> int:
    return main(["--home", str(arch.home.root), *args])


def test_expired_deleted_and_logged_held_kept_audit_clean(
        arch: SimArchive, capsys: pytest.CaptureFixture[str]) -> None:
    home = arch.home
    home.config_path.write_text(POLICY)
    calls = find_calls(home)
    box_sim = [c for c in calls if c.device == "box-sim"]
    held_call = box_sim[2]
    window = [c for c in box_sim if c.line == "L2"][-2:]  # a device hold over a time span
    since = window[0].start_ns
    assert run(arch, "hold", "add", "--call", held_call.call_id,
               "--reason", "dispute 4711") == 0
    assert run(arch, "hold", "add", "--device", "box-sim", "--since",
               datetime.fromtimestamp(since / 1e9, UTC).isoformat(), "--reason",
               "regulator request") == 0
    capsys.readouterr()
    assert run(arch, "hold", "ls", "--json") == 0
    holds = json.loads(capsys.readouterr().out)
    assert [h["hold_id"] for h in holds] == ["H1", "H2"]

    # 40 days after the recording: box-sim's 30 days are up, box-pci L2 (60) and L1 (3650) not.
    before = {(c.device, p.seq) for c in calls for p in c.parts}
    assert run(arch, "retention", "run", "--now", "2023-12-25T00:00Z", "--dry-run") == 0
    assert "would delete" in capsys.readouterr().out
    assert {(d, s) for d in ("box-sim", "box-pci") for s in
            [r.seq for r in Store(home).iter_refs(d)]} == before
    assert run(arch, "retention", "run", "--now", "2023-12-25T00:00Z") == 0
    out = capsys.readouterr().out
    held_ids = {held_call.call_id} | {c.call_id for c in box_sim if c.start_ns >= since}
    expect_deleted = {c.call_id for c in box_sim if c.call_id not in held_ids}
    assert expect_deleted and len(held_ids) >= 2
    left = find_calls(home)
    assert {c.call_id for c in left} == {c.call_id for c in calls} - expect_deleted
    stored = {(r.device_id, r.seq) for r in Store(home).iter_refs()}
    gone = {(c.device, p.seq) for c in box_sim if c.call_id in expect_deleted for p in c.parts}
    assert stored == before - gone
    assert "kept (legal hold)" in out

    # the deletion log: one signed entry per deleted segment, with its hashes and policy
    log = [json.loads(x) for x in (home.root / "logs" / "deletions.jsonl").read_text().splitlines()]
    assert {(e["device"], e["seq"]) for e in log} == gone
    assert {e["policy"] for e in log} == {"default: 30 days"}
    assert all(len(e["manifest_sha256"]) == 64 and e["sig"] for e in log)

    # the audit is clean and names each deletion, never as missing
    assert run(arch, "verify") == 0
    report = capsys.readouterr().out
    assert report.count("DELETED ") == len(gone) and "missing" not in report
    assert run(arch, "verify", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["deleted_by_policy"]) == len(gone)

    # a year on: box-pci L2 (60 days) goes, its L1 (group rule, 10 years) stays
    assert run(arch, "retention", "run", "--now", "2024-12-01T00:00Z") == 0
    left = find_calls(home)
    assert {c.device for c in left if c.call_id not in held_ids} == {"box-pci"}
    assert {c.line for c in left if c.device == "box-pci"} == {"L1"}
    capsys.readouterr()
    assert run(arch, "verify") == 0

    # a changed entry of the deletion log is detected
    path = home.root / "logs" / "deletions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["policy"] = "default: 3650 days"
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    path.write_text("".join(lines))
    capsys.readouterr()
    assert run(arch, "verify") == 1
    out = capsys.readouterr().out
    assert "deletion log line 2" in out and "signature does not verify" in out


def test_lifted_hold_lets_retention_delete_and_compliance_floor_holds(
        arch: SimArchive, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = arch.home
    home.config_path.write_text("[retention]\ndays = 30\ncompliance_min_days = 20\n")
    call = find_calls(home)[0]
    assert run(arch, "hold", "add", "--call", call.call_id, "--device", call.device,
               "--reason", "case 9") == 0
    assert run(arch, "retention", "run", "--now", "2024-06-01T00:00Z") == 0
    assert [c.call_id for c in find_calls(home)] == [call.call_id]
    assert run(arch, "hold", "remove", "H1", "--reason", "case closed") == 0
    assert run(arch, "retention", "run", "--now", "2024-06-01T00:00Z") == 0
    assert find_calls(home) == []
    capsys.readouterr()
    assert run(arch, "verify") == 0
    # the boxes (or a replay of their old messages) cannot bring deleted segments back
    intake = SegmentIntake(home)
    for device in ("box-sim", "box-pci"):
        for seg in outbox_segments(recorder_config(tmp_path / device, home.recipients()[0], device=device)):
            out = intake.handle(segment_topic(device, seg.seq), encode_wire(seg))
            assert out.ack is not None and out.ack.result == "duplicate", out.detail
    intake.close()
    assert list(Store(home).iter_refs()) == [] and find_calls(home) == []
    # compliance mode: the minimum cannot be shortened, nor a rule set below it
    home.config_path.write_text("[retention]\ndays = 10\ncompliance_min_days = 5\n")
    assert run(arch, "retention", "run") == 2
    assert "can never be lowered" in capsys.readouterr().err
    home.config_path.write_text("[retention]\ndays = 10\ncompliance_min_days = 20\n")
    assert run(arch, "retention", "run") == 2
    assert "less than the compliance minimum" in capsys.readouterr().err


def test_serve_applies_retention_in_the_background(home: Home, box: Box) -> None:
    intake = SegmentIntake(home)
    for seg in box.seal_call("old", known_signal(1600), 2):  # recorded in 2023
        intake.handle(segment_topic(box.device_id, seg.seq), encode_wire(seg))
    intake.close()
    home.config_path.write_text("[retention]\ndays = 30\n")
    stop = threading.Event()
    thread = threading.Thread(target=retention_loop, args=(home, stop),
                              kwargs={"first_delay_s": 0.0, "every_s": 0.05})
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while find_calls(home) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert find_calls(home) == [] and list(Store(home).iter_refs()) == []
    assert len(deletion_audit(home).deleted) == 2
