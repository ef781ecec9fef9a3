"""The archive store: commit point, duplicates, conflicts kept in quarantine, never overwritten."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from central.home import init_home, open_home, parse_config
from central.store import SegmentConflict, Store
from linerec_contract.errors import ConfigError, StateDirError

from .central_helpers import DEVICE, Box, known_signal


def test_put_writes_manifest_and_payload_then_load_round_trips(home, box: Box) -> None:
    seg = box.seal_call("c1", known_signal(800), 1)[0]
    store = Store(home)
    assert store.put(seg) == "stored"
    ref = store.ref(DEVICE, 0)
    assert ref.manifest_path.name == "000000000000.manifest.json"
    assert ref.payload_path.read_bytes() == seg.payload
    assert ref.manifest_path.read_bytes() == seg.signed_manifest_json()
    loaded = store.load(DEVICE, 0)
    assert loaded.manifest == seg.manifest and loaded.signature == seg.signature
    assert loaded.payload == seg.payload
    assert [r.seq for r in store.iter_refs()] == [0]


def test_same_segment_again_is_duplicate_and_files_untouched(home, box: Box) -> None:
    seg = box.seal_call("c1", known_signal(800), 1)[0]
    store = Store(home)
    store.put(seg)
    ref = store.ref(DEVICE, 0)
    before = (ref.manifest_path.stat().st_mtime_ns, ref.payload_path.stat().st_mtime_ns)
    assert store.put(seg) == "duplicate"
    after = (ref.manifest_path.stat().st_mtime_ns, ref.payload_path.stat().st_mtime_ns)
    assert before == after
    assert store.quarantine_entries() == []


def test_different_segment_with_same_seq_is_quarantined_never_overwrites(home, box: Box) -> None:
    first = box.seal_call("c1", known_signal(800, seed=1), 1)[0]
    box.seq, box.prev = 0, None  # a box that lost its state and reuses seq 0
    second = box.seal_call("c2", known_signal(800, seed=2), 1)[0]
    assert first.seq == second.seq == 0 and first.manifest_sha256 != second.manifest_sha256
    store = Store(home)
    store.put(first)
    with pytest.raises(SegmentConflict) as caught:
        store.put(second)
    assert store.load(DEVICE, 0).manifest_sha256 == first.manifest_sha256
    entry = caught.value.quarantine_path
    assert (entry / "manifest.json").read_bytes() == second.signed_manifest_json()
    assert (entry / "payload.age").read_bytes() == second.payload
    assert "conflict" in (entry / "reason.txt").read_text()
    assert store.quarantine_entries() == [entry]


def test_same_manifest_with_other_payload_is_a_conflict(home, box: Box) -> None:
    seg = box.seal_call("c1", known_signal(800), 1)[0]
    store = Store(home)
    store.put(seg)
    forged = type(seg)(manifest=seg.manifest, signature=seg.signature, payload=seg.payload + b"x")
    with pytest.raises(SegmentConflict):
        store.put(forged)
    assert store.load(DEVICE, 0).payload == seg.payload


def test_torn_put_payload_without_manifest_is_not_a_segment(home, box: Box) -> None:
    seg = box.seal_call("c1", known_signal(800), 1)[0]
    store = Store(home)
    ref = store.ref(DEVICE, 0)
    ref.payload_path.parent.mkdir(parents=True)
    ref.payload_path.write_bytes(b"half a payload")  # crash after the payload, before the commit
    assert list(store.iter_refs()) == []
    assert store.put(seg) == "stored"
    assert store.load(DEVICE, 0).payload == seg.payload


def test_disk_full_during_manifest_leaves_no_committed_segment(home, box: Box, monkeypatch) -> None:
    seg = box.seal_call("c1", known_signal(800), 1)[0]
    store = Store(home)
    real_open = os.open

    def full_on_manifest(path, flags, *args):
        if str(path).endswith(".manifest.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", full_on_manifest)
    with pytest.raises(OSError) as caught:
        store.put(seg)
    assert caught.value.errno == errno.ENOSPC
    assert not store.exists(DEVICE, 0)
    monkeypatch.setattr(os, "open", real_open)
    assert store.put(seg) == "stored"


def test_quarantine_raw_message_keeps_bytes_and_reason(home) -> None:
    entry = Store(home).quarantine("box-9", 7, b"\x00garbage", "malformed segment: too short")
    assert (entry / "message.bin").read_bytes() == b"\x00garbage"
    assert "too short" in (entry / "reason.txt").read_text()
    assert entry.parent == home.quarantine_dir / "box-9"
    weird = Store(home).quarantine("../../etc", None, b"x", "bad topic")
    assert weird.parent == home.quarantine_dir / "_unknown"


def test_init_home_is_idempotent_and_keeps_the_key(tmp_path: Path) -> None:
    first = init_home(tmp_path / "c")
    secret = first.identity()
    assert stat.S_IMODE(first.identity_path.stat().st_mode) == 0o600
    again = init_home(tmp_path / "c")
    assert again.identity() == secret and again.recipients() == first.recipients()
    assert len(again.recipients()) == 1 and again.recipients()[0].startswith("age1")


def test_open_home_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(StateDirError, match="does not exist"):
        open_home(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StateDirError, match="not a central home"):
        open_home(tmp_path / "plain")


def test_enroll_validates_and_refuses_silent_key_change(home, box_key) -> None:
    device = home.enroll("box-2", box_key.public_b64)
    assert device.key_id == box_key.key_id
    assert home.enroll("box-2", box_key.public_b64) == device
    with pytest.raises(ConfigError, match="not base64|32 bytes"):
        home.enroll("box-3", "not-a-key")
    with pytest.raises(ConfigError, match="device id"):
        home.enroll("../evil", box_key.public_b64)
    from linerec_contract.identity import DeviceKey

    other = DeviceKey.generate()
    with pytest.raises(ConfigError, match="--replace"):
        home.enroll("box-2", other.public_b64)
    replaced = home.enroll("box-2", other.public_b64, replace=True)
    assert replaced.keys() == {box_key.key_id: box_key.public_b64, other.key_id: other.public_b64}


def test_central_toml_checked_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "central.toml"
    path.write_text('[broker]\nhost = "mq"\nport = 8883\nca = "pki/ca.crt"\n[receiver]\ngroup = "g"\n')
    cfg = parse_config(path)
    assert (cfg.host, cfg.port, cfg.ca, cfg.group) == ("mq", 8883, tmp_path / "pki/ca.crt", "g")
    path.write_text("[broker]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"broker\.prot"):
        parse_config(path)
    path.write_text("[broker]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"1\.\.65535"):
        parse_config(path)
    path.write_text('[broker]\nport = "x"\n')
    with pytest.raises(ConfigError, match="must be a int"):
        parse_config(path)


def test_quarantine_is_bounded_per_device_and_in_total(home) -> None:
    from central.home import Limits

    limits = Limits(quarantine_mb=1, quarantine_device_mb=1, quarantine_entries=5,
                    quarantine_device_entries=3)
    store = Store(home, limits)
    blob = b"\x00" * 100_000

    def entries(dev: str) -> list[str]:
        return [p.name for p in store.quarantine_entries() if p.parent.name == dev]

    first_a = store.quarantine("box-a", 0, blob, "test").name
    for seq in range(1, 4):
        store.quarantine("box-a", seq, blob, "test")
    # the device's entry bound: its own oldest entry went first
    assert len(entries("box-a")) == 3 and first_a not in entries("box-a")
    assert store.counts["quarantine_dropped"] == 1
    # box-c's entry is the oldest of all, but box-a holds the most: the total bound (5 entries)
    # makes room at box-a
    (home.quarantine_dir / "box-c").mkdir()
    old_c = store.quarantine("box-c", 0, blob[:10], "test")
    os.utime(old_c, (1, 1))
    for seq in range(2):
        store.quarantine("box-b", seq, blob[:50_000], "test")
    assert (len(entries("box-a")), len(entries("box-b")), len(entries("box-c"))) == (2, 2, 1)
    assert store.counts["quarantine_dropped"] == 2
    # an entry larger than a bound on its own keeps only its reason
    big = store.quarantine("box-c", 9, b"\x01" * (2 * 1024 * 1024), "too big")
    assert [p.name for p in big.iterdir()] == ["reason.txt"]
    assert "not kept" in (big / "reason.txt").read_text()
    assert store.quarantine_bytes() <= 1024 * 1024


def test_a_payload_file_is_linked_into_the_store_or_copied_across_filesystems(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same filesystem: the spooled payload file becomes the stored object (one inode, no
    copy). Another filesystem (link fails with EXDEV, simulated: the test has one filesystem):
    copied block by block. Either way read-only and never replaced."""
    import hashlib

    from central.backends import ObjectExists
    from central.backends.filesystem import FsObjectStore

    objects = FsObjectStore(tmp_path / "store")
    data = os.urandom(3 * 1024 * 1024 + 5)
    sha = hashlib.sha256(data).hexdigest()
    linked = tmp_path / "a.payload"
    linked.write_bytes(data)
    objects.write_once_file("box-1/000000000001.age", linked, len(data), sha)
    stored = objects.path("box-1/000000000001.age")
    assert stored.stat().st_ino == linked.stat().st_ino
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444

    real_link = os.link
    crossed = []

    def link(src: object, dst: object, **kw: object) -> None:
        if str(src).endswith(".payload"):
            crossed.append(src)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    copied = tmp_path / "b.payload"
    copied.write_bytes(data)
    monkeypatch.setattr(os, "link", link)
    objects.write_once_file("box-1/000000000002.age", copied, len(data), sha)
    monkeypatch.undo()
    assert crossed, "the cross-filesystem path was not taken"
    second = objects.path("box-1/000000000002.age")
    assert second.stat().st_ino != copied.stat().st_ino and second.read_bytes() == data
    assert objects.sha256("box-1/000000000002.age") == sha
    assert stat.S_IMODE(second.stat().st_mode) == 0o444
    with pytest.raises(ObjectExists):
        objects.write_once_file("box-1/000000000001.age", copied, len(data), sha)
