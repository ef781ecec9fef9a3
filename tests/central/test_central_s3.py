"""The S3 storage backend against moto's server mode (the stand-in for an S3 service: none can
run here). Objects are written once with Object Lock retention where the bucket has it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from central.backends import ObjectExists, storage_config
from central.backends.s3 import S3ObjectStore
from central.cli import main
from central.home import Home
from central.index import open_index
from central.receiver import SegmentIntake
from central.store import SegmentConflict, Store
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire

from .central_helpers import DEVICE, Box, known_signal
from .s3_server import S3Stand


def cli(home: Home, *args: str) -> int:
    return main(["--home", str(home.root), *args])


def test_s3_store_write_once_with_object_lock(
        home: Home, box: Box, s3_server: S3Stand, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bucket = s3_server.bucket(object_lock=True)
    home.config_path.write_text(s3_server.toml(bucket, object_lock="required"))
    segs = box.seal_call("c1", known_signal(2400), 3)
    intake = SegmentIntake(home)
    try:
        for seg in segs:
            outcome = intake.handle(segment_topic(DEVICE, seg.seq), encode_wire(seg))
            assert outcome.ack is not None and outcome.ack.result == "stored", outcome.detail
        again = intake.handle(segment_topic(DEVICE, 0), encode_wire(segs[0]))
        assert again.ack is not None and again.ack.result == "duplicate"
    finally:
        intake.close()
    assert not any(home.store_dir.glob("*/*.age")), "nothing may land on the local disk"

    s3 = s3_server.client()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"box-1/{s:012d}{ext}" for s in range(3) for ext in (".age", ".manifest.json")]
    head = s3.head_object(Bucket=bucket, Key="box-1/000000000000.manifest.json")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    years = (head["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.UTC)).days / 365.25
    assert 6.9 < years < 7.1
    # Retention holds: the stored version cannot be deleted, not even by the bucket's owner.
    version = head["VersionId"]
    with pytest.raises(ClientError) as denied:
        s3.delete_object(Bucket=bucket, Key="box-1/000000000000.manifest.json", VersionId=version)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"

    # Never overwritten: the backend refuses, and a different segment with a stored seq is a
    # conflict that goes to quarantine while the stored objects keep their single version.
    store = Store(home)
    with pytest.raises(ObjectExists):
        store.objects.write_once("box-1/000000000000.age", b"other bytes")
    box.seq, box.prev = 0, None
    impostor = box.seal_call("c9", known_signal(800, seed=7), 1)[0]
    with pytest.raises(SegmentConflict):
        store.put(impostor)
    versions = s3.list_object_versions(Bucket=bucket, Prefix="box-1/000000000000")["Versions"]
    assert len(versions) == 2 and store.load(DEVICE, 0).manifest_sha256 == segs[0].manifest_sha256

    # Index locations name the objects; verify, reindex and export read from the bucket.
    with open_index(home) as index:
        rows = index.segments()
    assert rows[0]["manifest_path"] == f"s3://{bucket}/box-1/000000000000.manifest.json"
    capsys.readouterr()
    assert cli(home, "verify", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["segments"] == 3 and report["index_issues"] == [] and report["ok"]
    assert cli(home, "reindex") == 0
    with open_index(home) as index:
        assert index.segments() == rows
    assert cli(home, "export", "--reason", "audit check", "c1", "--out", str(tmp_path / "c1.wav")) == 0


def test_object_lock_policies(home: Home, s3_server: S3Stand,
                              capsys: pytest.CaptureFixture[str]) -> None:
    plain = s3_server.bucket(object_lock=False)
    home.config_path.write_text(s3_server.toml(plain, object_lock="required"))
    assert cli(home, "verify") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no Object Lock" in err, err
    # "auto" stores without retention on such a bucket (and says so in the log).
    home.config_path.write_text(s3_server.toml(plain, prefix="site-a"))
    objects = S3ObjectStore(storage_config(home.config_path))
    assert objects.object_lock is False
    objects.write_once("box-1/x", b"data")
    head: Any = s3_server.client().head_object(Bucket=plain, Key="site-a/box-1/x")
    assert "ObjectLockMode" not in head
    assert objects.list_devices() == ["box-1"] and objects.list_names("box-1") == ["x"]
    home.config_path.write_text(s3_server.toml("no-such-bucket"))
    assert cli(home, "verify") == 2
    assert "no-such-bucket does not exist" in capsys.readouterr().err


def test_torn_puts_on_s3(home: Home, box: Box, s3_server: S3Stand) -> None:
    """A receiver killed between payload and manifest leaves a payload no manifest names."""
    bucket = s3_server.bucket(object_lock=True)
    home.config_path.write_text(s3_server.toml(bucket))
    segs = box.seal_call("c1", known_signal(1600), 2)
    store = Store(home)
    # The same segment again (the broker's redelivery): its whole payload is kept, not rewritten.
    store.objects.write_once(store.ref(DEVICE, 0).payload_key, segs[0].payload)
    # Another segment's bytes under seq 1 (a box that lost its state): discarded and replaced.
    store.objects.write_once(store.ref(DEVICE, 1).payload_key, b"a payload nothing names")
    assert [r.seq for r in store.iter_refs()] == []
    assert store.put(segs[0]) == "stored" and store.put(segs[1]) == "stored"
    s3 = s3_server.client()
    versions = s3.list_object_versions(Bucket=bucket)
    counts: dict[str, int] = {}
    for v in versions["Versions"]:
        counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    assert counts == {"box-1/000000000000.age": 1, "box-1/000000000000.manifest.json": 1,
                      "box-1/000000000001.age": 2, "box-1/000000000001.manifest.json": 1}
    # The discarded bytes stay under their retention, hidden behind a delete marker.
    assert [m["Key"] for m in versions.get("DeleteMarkers", [])] == ["box-1/000000000001.age"]
    assert store.load(DEVICE, 1).payload == segs[1].payload


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_spooled_segments_are_stored_compared_and_quarantined_from_their_files(
        home: Home, box: Box, box_key: Any, s3_server: S3Stand, tmp_path: Path,
        backend: str) -> None:
    """A segment handed over as a file (joined MQTT chunks, an HTTPS body): stored streamed
    from disk, a second copy answered "duplicate" by hash, a different one quarantined."""
    if backend == "s3":
        home.config_path.write_text(s3_server.toml(s3_server.bucket(object_lock=False)))
    seg = box.seal_call("c1", known_signal(2400), 1)[0]
    other = Box(DEVICE, box_key, home.recipients()).seal_call("c2", known_signal(900, seed=3),
                                                             1)[0]
    assert other.seq == seg.seq and other.payload != seg.payload

    def spool(s: Any, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(encode_wire(s))
        return path

    intake = SegmentIntake(home)
    try:
        results = []
        for s, name in ((seg, "a.body"), (seg, "b.body"), (other, "c.body")):
            outcome = intake.handle(segment_topic(DEVICE, s.seq), spool(s, name))
            assert outcome.ack is not None and outcome.ack.sha256 == s.payload_sha256
            results.append(outcome.ack.result)
    finally:
        intake.close()
    assert results == ["stored", "duplicate", "rejected"]
    assert not list(tmp_path.glob("*.payload")), "payload files are removed after the put"
    store = Store(home)
    assert store.load(DEVICE, seg.seq).payload == seg.payload
    assert store.objects.sha256(store.ref(DEVICE, seg.seq).payload_key) == seg.payload_sha256
    [entry] = store.quarantine_entries()
    assert (entry / "payload.age").read_bytes() == other.payload
    if backend == "filesystem":
        assert store.ref(DEVICE, seg.seq).payload_path.stat().st_mode & 0o777 == 0o444


def test_s3_streams_a_large_payload_file_up_and_hashes_it_back_in_blocks(
        home: Home, s3_server: S3Stand, tmp_path: Path) -> None:
    """write_once_file and sha256 of a 64 MiB object in a process of their own: its peak
    memory grows by a few blocks, not by the object (read from /proc VmHWM)."""
    import hashlib
    import os
    import subprocess
    import sys

    home.config_path.write_text(s3_server.toml(s3_server.bucket(object_lock=False)))
    data = tmp_path / "payload.age"
    with data.open("wb") as fh:
        for _ in range(64):
            fh.write(os.urandom(1 << 20))
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    script = (
        "import re, sys; from pathlib import Path\n"
        "from central.backends import open_object_store\n"
        "def hwm():\n"
        "    text = Path('/proc/self/status').read_text()\n"
        "    return int(re.search(r'^VmHWM:\\s+(\\d+)', text, re.M).group(1)) << 10\n"
        f"objects = open_object_store(Path({str(home.config_path)!r}), Path('store'))\n"
        "objects.exists('box-1/warm-up')\n"
        "before = hwm()\n"
        f"objects.write_once_file('box-1/000000000001.age', Path({str(data)!r}), "
        f"{data.stat().st_size}, {sha!r})\n"
        "got = objects.sha256('box-1/000000000001.age')\n"
        "print(before, hwm(), got)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    before, peak, got = done.stdout.split()
    print(f"S3 streamed upload + hash of 64 MiB: VmHWM {int(before) >> 20} -> "
          f"{int(peak) >> 20} MiB")
    assert got == sha
    assert int(peak) - int(before) < 16 << 20, (before, peak)
