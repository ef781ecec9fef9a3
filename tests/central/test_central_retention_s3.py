"""Retention on the S3 backend (moto's server stands in for the service): a segment still under
Object Lock is kept and reported, not logged; without a lock every version is deleted."""

from __future__ import annotations

import pytest

from central.cli import main
from central.home import Home
from central.receiver import SegmentIntake
from central.search import find_calls
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire

from .central_helpers import DEVICE, Box, known_signal
from .s3_server import S3Stand


def fill(home: Home, box: Box) -> None:
    intake = SegmentIntake(home)
    for seg in box.seal_call("c1", known_signal(2400), 2) + box.seal_call("c2", known_signal(900), 1):
        out = intake.handle(segment_topic(DEVICE, seg.seq), encode_wire(seg))
        assert out.ack is not None and out.ack.result == "stored", out.detail
    intake.close()


def test_object_lock_keeps_what_it_locks(home: Home, box: Box, s3_server: S3Stand,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_server.bucket(object_lock=True)
    home.config_path.write_text(s3_server.toml(bucket, object_lock="required")
                                + "retention_days = 1\n[retention]\ndays = 30\n")
    fill(home, box)  # recorded in 2023: the policy's 30 days are long over, the lock is not
    assert main(["--home", str(home.root), "retention", "run"]) == 0
    out = capsys.readouterr().out
    assert out.count("kept (locked)") == 2 and "0 call(s) deleted" in out
    assert len(find_calls(home)) == 2
    assert not (home.root / "logs" / "deletions.jsonl").exists()
    assert main(["--home", str(home.root), "verify"]) == 0


def test_without_lock_every_version_is_deleted(home: Home, box: Box, s3_server: S3Stand,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_server.bucket(object_lock=False)
    s3 = s3_server.client()
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    home.config_path.write_text(s3_server.toml(bucket, object_lock="off")
                                + "[retention]\ndays = 30\n")
    fill(home, box)
    assert main(["--home", str(home.root), "retention", "run"]) == 0
    assert "2 call(s) deleted" in capsys.readouterr().out
    listing = s3.list_object_versions(Bucket=bucket)
    assert listing.get("Versions", []) == [] and listing.get("DeleteMarkers", []) == []
    assert find_calls(home) == []
    assert main(["--home", str(home.root), "verify"]) == 0
    assert capsys.readouterr().out.count("DELETED ") == 3
