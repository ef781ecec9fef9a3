"""Export with proof, the offline check, and the access log, over an archive the real recorder
made from simulated lines. The reference audio is what the simulator put on the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from central.cli import main
from central.search import CallRecord, find_calls

from .sim_archive import SimArchive, build


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> SimArchive:
    return build(tmp_path_factory.mktemp("sim"))


def multipart(arch: SimArchive) -> CallRecord:
    calls = [c for c in find_calls(arch.home) if c.device == "box-sim" and c.complete]
    return max(calls, key=lambda c: len(c.parts))


def line_audio(arch: SimArchive, call: CallRecord) -> np.ndarray:
    first = call.parts[0].start_frame
    column = int(call.line[1:]) - 1
    return arch.renders[call.device](first, call.frames)[:, column]


def run(arch: SimArchive, *args: str) -> int:
    return main(["--home", str(arch.home.root), *args])


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_export_equals_the_line_and_its_proof_checks(arch: SimArchive, tmp_path: Path,
                                                     suffix: str, capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    call = multipart(arch)
    assert len(call.parts) >= 3
    out = tmp_path / f"call.{suffix}"
    assert run(arch, "export", call.call_id, "--out", str(out), "--reason", "dispute 4711") == 0
    summary = capsys.readouterr().out
    assert f"{len(call.parts)} part(s)" in summary and "dispute 4711" in summary
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 8000
    np.testing.assert_array_equal(audio, line_audio(arch, call))
    proof = json.loads((tmp_path / f"call.{suffix}.verification.json").read_text())
    assert proof["call"]["device"] == "box-sim" and proof["call"]["call_id"] == call.call_id
    assert [p["seq"] for p in proof["parts"]] == [p.seq for p in call.parts]
    assert all(p["signature_status"] == "ok" for p in proof["parts"])
    assert (tmp_path / f"call.{suffix}.verification.txt").read_text() == proof["summary"]
    # checked offline: only the two files, no home
    assert main(["check-export", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    out.write_bytes(bytes(data))
    assert main(["check-export", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_changed_proof_or_sample_hash_fails(arch: SimArchive, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    call = multipart(arch)
    out = tmp_path / "c.wav"
    assert run(arch, "export", call.call_id, "--out", str(out), "--reason", "QA review") == 0
    proof_file = tmp_path / "c.wav.verification.json"
    good = proof_file.read_text()
    doc = json.loads(good)
    doc["call"]["start"] = "2020-01-01T00:00:00.000+00:00"  # a reworded proof
    proof_file.write_text(json.dumps(doc))
    assert main(["check-export", str(out)]) == 1
    assert "central's signature on the proof does not verify" in capsys.readouterr().out
    proof_file.write_text(good)
    assert main(["check-export", str(out), "--central-key", "ed25519:0000000000000000"]) == 1
    assert main(["check-export", str(out), "--central-key", doc["central_key_id"]]) == 0


def test_export_all_with_filters_and_every_export_is_in_the_access_log(
        arch: SimArchive, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    before = run(arch, "access-log", "--json")
    assert before == 0
    known = len(json.loads(capsys.readouterr().out)["entries"])
    line = [c for c in find_calls(arch.home) if c.device == "box-sim" and c.line == "L1"]
    want = sorted(c.call_id for c in line if c.complete)
    assert len(want) == len(line) - 1  # the call still open when the recording ended
    folder = tmp_path / "out"
    folder.mkdir()
    assert run(arch, "export", "--all", str(folder), "--device", "box-sim", "--line", "L1",
               "--reason", "legal request 12", "--user", "auditor-7") == 1
    report = capsys.readouterr().out
    assert report.count("FAIL ") == 1 and "last part is missing" in report
    written = sorted(p.name for p in folder.glob("*.wav"))
    assert written == sorted(f"box-sim_{cid}.wav" for cid in want)
    for name in written:
        assert main(["check-export", str(folder / name)]) == 0
    capsys.readouterr()
    assert run(arch, "access-log", "--json") == 0
    log = json.loads(capsys.readouterr().out)
    assert log["intact"] and log["problems"] == []
    new = log["entries"][known:]
    assert sorted(e["call_id"] for e in new) == sorted(c.call_id for c in line)  # and attempts
    assert {(e["user"], e["reason"], e["action"]) for e in new} == {
        ("auditor-7", "legal request 12", "export")}


def test_export_needs_a_reason_and_a_tampered_access_log_is_detected(
        arch: SimArchive, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    call = multipart(arch)
    assert run(arch, "export", call.call_id, "--out", str(tmp_path / "x.wav")) == 2
    assert run(arch, "export", call.call_id, "--out", str(tmp_path / "x.wav"),
               "--reason", "  ") == 2
    assert "--reason" in capsys.readouterr().err
    assert not (tmp_path / "x.wav").exists()
    for reason in ("training", "second listen"):
        assert run(arch, "export", call.call_id, "--out", str(tmp_path / "x.wav"),
                   "--reason", reason) == 0
    capsys.readouterr()
    log = arch.home.root / "logs" / "access.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2
    log.chmod(0o640)
    log.write_bytes(b"".join(lines[:-2] + lines[-1:]))  # one access erased
    try:
        assert run(arch, "access-log") == 1
        assert "a line was removed or inserted" in capsys.readouterr().out
        assert run(arch, "verify") == 1
        assert "FAIL access-log: access log line" in capsys.readouterr().out
    finally:
        log.write_bytes(b"".join(lines))
    assert run(arch, "verify") == 0
