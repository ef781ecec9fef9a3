"""``appliance-central`` on a store of real sealed segments: calls, segments, export, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from central.cli import main
from central.home import Home
from central.receiver import SegmentIntake
from central.store import Store
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import SealedSegment, encode_wire

from .central_helpers import DEVICE, Box, known_signal


def receive(home: Home, segs: list[SealedSegment]) -> None:
    receiver = SegmentIntake(home)
    for seg in segs:
        outcome = receiver.handle(segment_topic(seg.device_id, seg.seq), encode_wire(seg))
        assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
    if receiver.index is not None:
        receiver.index.close()


def run(home: Home, *args: str) -> int:
    return main(["--home", str(home.root), *args])


@pytest.fixture()
def archive(home: Home, box: Box) -> tuple[Home, np.ndarray]:
    """Two calls: c-long (3 parts of a known signal) and c-short (1 part, line-2)."""
    signal = known_signal(8000 * 3 + 17)
    receive(home, box.seal_call("c-long", signal, 3))
    receive(home, box.seal_call("c-short", known_signal(400, seed=9), 1, line="line-2",
                                start_ns=1_800_000_000_000_000_000))
    return home, signal


def test_export_joins_parts_sample_exact(archive, tmp_path: Path, capsys) -> None:
    home, signal = archive
    out = tmp_path / "call.wav"
    assert run(home, "export", "--reason", "qa", "c-long", "--out", str(out)) == 0
    report = capsys.readouterr().out
    assert "3 part(s)" in report and "OK: wrote" in report and report.count("signature ok") == 3
    audio, rate = sf.read(out, dtype="int16")
    info = sf.info(out)
    assert (rate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    np.testing.assert_array_equal(audio, signal)


def test_export_fails_on_tampered_part_and_writes_nothing(archive, tmp_path: Path, capsys) -> None:
    home, _ = archive
    payload = Store(home).ref(DEVICE, 1).payload_path
    data = bytearray(payload.read_bytes())
    data[-5] ^= 0xFF
    payload.write_bytes(bytes(data))
    out = tmp_path / "call.wav"
    assert run(home, "export", "--reason", "qa", "c-long", "--out", str(out)) == 1
    report = capsys.readouterr().out
    assert "part 1 seq 1" in report and "FAIL" in report and "not written" in report
    assert not out.exists()


def test_export_fails_on_missing_part(home: Home, box: Box, tmp_path: Path, capsys) -> None:
    parts = box.seal_call("c-gap", known_signal(3000), 3)
    receive(home, [parts[0], parts[2]])
    assert run(home, "export", "--reason", "qa", "c-gap", "--out", str(tmp_path / "x.wav")) == 1
    assert "part number 2, expected 1" in capsys.readouterr().out


def test_calls_lists_and_filters(archive, capsys) -> None:
    home, _ = archive
    assert run(home, "calls", "--json") == 0
    calls = json.loads(capsys.readouterr().out)
    assert [(c["call_id"], c["parts"], c["complete"]) for c in calls] == [
        ("c-long", 3, True), ("c-short", 1, True)]
    assert calls[0]["duration_s"] == round((8000 * 3 + 17) / 8000, 3)
    assert calls[0]["start"].startswith("2023-11-14T22:13:20")
    assert run(home, "calls", "--line", "line-2") == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:3] == ["DEVICE", "LINE", "CALL"] and len(text) == 2 and "c-short" in text[1]
    assert run(home, "calls", "--since", "2025-01-01", "--json") == 0
    assert [c["call_id"] for c in json.loads(capsys.readouterr().out)] == ["c-short"]


def test_segments_lists_files_that_exist(archive, capsys) -> None:
    home, _ = archive
    assert run(home, "segments", "--json") == 0
    segs = json.loads(capsys.readouterr().out)
    assert [s["seq"] for s in segs] == [0, 1, 2, 3]
    for s in segs:
        assert Path(s["manifest_path"]).is_file() and Path(s["payload_path"]).is_file()
        assert s["status"] == "ok"


def test_verify_ok_then_detects_gap_and_bad_signature(archive, capsys) -> None:
    home, _ = archive
    assert run(home, "verify") == 0
    assert "OK: 4 segment(s)" in capsys.readouterr().out
    store = Store(home)
    ref = store.ref(DEVICE, 2)
    doc = json.loads(ref.manifest_path.read_bytes())
    doc["manifest"]["line"] = "line-9"  # an edit after signing
    ref.manifest_path.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    assert run(home, "verify", "--json") == 1
    result = json.loads(capsys.readouterr().out)
    assert not result["ok"]
    assert ("bad-signature", 2) in {(i["kind"], i["seq"]) for i in result["issues"]}


def test_verify_reports_a_gap(home: Home, box: Box, capsys) -> None:
    segs = box.seal_call("c1", known_signal(4000), 4)
    receive(home, [segs[0], segs[1], segs[3]])
    assert run(home, "verify") == 1
    out = capsys.readouterr().out
    assert "FAIL gap" in out and "2..2 missing" in out


def test_reindex_rebuilds_a_deleted_index(archive, capsys) -> None:
    home, _ = archive
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (home.root / name).unlink(missing_ok=True)
    assert run(home, "reindex") == 0
    assert "4 segment(s)" in capsys.readouterr().out
    assert run(home, "calls", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("appliance-central: error: "), err
    assert "Traceback" not in err
    return err


def test_bad_inputs_exit_2_with_one_line(archive, tmp_path: Path, capsys) -> None:
    home, _ = archive
    assert main(["--home", str(tmp_path / "missing"), "calls"]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert run(home, "export", "--reason", "qa", "no-such-call", "--out", str(tmp_path / "x.wav")) == 2
    assert "no call 'no-such-call'" in one_line_error(capsys)
    assert run(home, "export", "--reason", "qa", "c-long", "--out", str(tmp_path / "nodir" / "x.wav")) == 2
    assert "does not exist" in one_line_error(capsys)
    assert run(home, "calls", "--since", "yesterday") == 2
    assert "--since" in one_line_error(capsys)
    assert run(home, "frobnicate") == 2
    assert "invalid choice" in one_line_error(capsys)
    assert main(["calls"]) == 2
    assert "--home" in one_line_error(capsys)
    assert run(home, "enroll", "box-7", "AAAA") == 2
    assert "32 bytes" in one_line_error(capsys)
    assert run(home, "serve") == 2
    assert "broker host is not set" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_exits_2(archive, tmp_path: Path, capsys) -> None:
    home, _ = archive
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run(home, "export", "--reason", "qa", "c-long", "--out", str(locked / "x.wav")) == 2
    assert "cannot write" in one_line_error(capsys)


def test_unwritable_out_via_readonly_target(archive, tmp_path: Path, capsys) -> None:
    home, _ = archive
    assert run(home, "export", "--reason", "qa", "c-long", "--out", "/proc/version") == 2
    one_line_error(capsys)


def test_console_script_init_enroll(tmp_path: Path, box_key) -> None:
    exe = Path(sys.executable).with_name("appliance-central")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "central"]
    home = tmp_path / "c"
    done = subprocess.run([*cmd, "--home", str(home), "init"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip().startswith("age1")
    again = subprocess.run([*cmd, "--home", str(home), "init"], capture_output=True, text=True, check=False)
    assert again.stdout == done.stdout
    enrolled = subprocess.run([*cmd, "--home", str(home), "enroll", DEVICE, box_key.public_b64],
                              capture_output=True, text=True, check=False)
    assert enrolled.returncode == 0 and box_key.key_id in enrolled.stdout
