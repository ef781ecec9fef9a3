"""``appliance verify SEGMENT...``: signatures, payload hashes and chain continuity on the box.

Accepted inputs: wire blobs (the outbox's ``seg-*.seg`` files, as sent to central) and central's
stored segments (``NNN.manifest.json`` with its ``NNN.age`` payload beside it; either file may be
named). Payloads are hashed while they are read, in fixed-size chunks: memory stays constant
whatever the file size. Anything that is not a regular file (a FIFO, a device, a folder) is
refused in one line, without reading from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from linerec_contract.errors import FormatError, VerificationError
from linerec_contract.segment import MAX_SIGNED_MANIFEST, WIRE_HEADER, WIRE_MAGIC, WIRE_VERSION

CHUNK = 1 << 20
MANIFEST_SUFFIX = ".manifest.json"  # central/store.py's layout
PAYLOAD_SUFFIX = ".age"
ACCEPTED = ("accepted: a wire blob (seg-*.seg) or central's NNN.manifest.json with its NNN.age")


@dataclass
class Loaded:
    """A segment's manifest, with the size and SHA-256 of its payload as read from disk."""

    manifest_json: bytes
    payload_size: int
    payload_sha256: str


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (a FIFO is never waited on)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise FormatError(f"{path} is {kind}, not a segment file ({ACCEPTED})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _hash_rest(f: BinaryIO) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(view)  # type: ignore[attr-defined]
        if not n:
            return size, h.hexdigest()
        h.update(view[:n])
        size += n


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise FormatError(f"{what}: ends after {0 if not data else len(data)} of {n} bytes")
    return bytes(data)


def load_wire(path: Path) -> Loaded:
    with _open_regular(path) as f:
        total = os.fstat(f.fileno()).st_size
        if total < WIRE_HEADER.size:
            raise FormatError(f"{path}: {total} bytes, shorter than the {WIRE_HEADER.size}-byte "
                              f"segment header ({ACCEPTED})")
        magic, version, flags, reserved, mlen, plen = WIRE_HEADER.unpack(
            _read_exact(f, WIRE_HEADER.size, str(path)))
        if magic != WIRE_MAGIC:
            raise FormatError(f"{path}: starts with {magic!r}, not {WIRE_MAGIC!r} ({ACCEPTED})")
        if version != WIRE_VERSION:
            raise FormatError(f"{path}: segment version {version} is unsupported "
                              f"(accepted: {WIRE_VERSION})")
        if flags or reserved:
            raise FormatError(f"{path}: non-zero reserved header bytes")
        if mlen > MAX_SIGNED_MANIFEST:
            raise FormatError(f"{path}: manifest length {mlen} exceeds {MAX_SIGNED_MANIFEST}")
        expected = WIRE_HEADER.size + mlen + plen
        if total != expected:
            raise FormatError(f"{path}: {total} bytes; its header announces {expected} "
                              "(truncated or trailing bytes)")
        manifest = _read_exact(f, mlen, str(path))
        size, digest = _hash_rest(f)
    if size != plen:
        raise FormatError(f"{path}: payload changed while being read ({size} of {plen} bytes)")
    return Loaded(manifest, size, digest)


def stored_pair(path: Path) -> tuple[Path, Path] | None:
    """(manifest, payload) when ``path`` names one half of a segment as central stores it."""
    name = path.name
    if name.endswith(MANIFEST_SUFFIX):
        stem = name[: -len(MANIFEST_SUFFIX)]
        return path, path.with_name(stem + PAYLOAD_SUFFIX)
    if name.endswith(PAYLOAD_SUFFIX):
        manifest = path.with_name(name[: -len(PAYLOAD_SUFFIX)] + MANIFEST_SUFFIX)
        if manifest.exists():
            return manifest, path
    return None


def load_stored(manifest_path: Path, payload_path: Path) -> Loaded:
    with _open_regular(manifest_path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_SIGNED_MANIFEST:
            raise FormatError(f"{manifest_path}: {size} bytes; a signed manifest is at most "
                              f"{MAX_SIGNED_MANIFEST}")
        manifest = _read_exact(f, size, str(manifest_path))
    try:
        payload = _open_regular(payload_path)
    except FileNotFoundError:
        raise FormatError(f"{manifest_path}: its payload {payload_path.name} is missing "
                          "(central stores both side by side)") from None
    with payload:
        psize, digest = _hash_rest(payload)
    return Loaded(manifest, psize, digest)


def verify_command(paths: list[Path], public_b64: str, *, as_json: bool,
                   start_seq: int | None = 0, start_note: str = "") -> int:
    from linerec_contract.segment import SealedSegment
    from linerec_contract.trust import DeviceTrust
    from linerec_contract.verify import audit_chain, check_payload_digest, verify_manifest

    results: list[dict[str, Any]] = []
    good: list[SealedSegment] = []
    seen: set[Path] = set()
    for path in paths:
        pair = stored_pair(path)
        key = pair[0] if pair else path
        if key in seen:
            continue  # both halves of one stored segment were named
        seen.add(key)
        shown = str(pair[0]) if pair else str(path)
        try:
            loaded = load_stored(*pair) if pair else load_wire(path)
            seg = SealedSegment.from_parts(loaded.manifest_json, b"")
            verify_manifest(seg, public_b64)
            check_payload_digest(seg, loaded.payload_size, loaded.payload_sha256)
        except OSError as err:
            results.append({"file": shown, "ok": False, "error": f"cannot read: {err.strerror}"})
            continue
        except (FormatError, VerificationError) as err:
            results.append({"file": shown, "ok": False, "error": str(err)})
            continue
        good.append(seg)
        results.append({"file": shown, "ok": True, "seq": seg.seq})
    if good and start_seq is not None:
        start_seq = min(start_seq, min(s.seq for s in good))
    # The key given is trusted for the devices of the segments it verified, each on its own.
    trust = {s.device_id: DeviceTrust.of_keys(s.device_id, [public_b64]) for s in good}
    issues = audit_chain(good, trust, start_seq=start_seq, check_payloads=False)
    ok = all(r["ok"] for r in results) and not issues
    if as_json:
        print(json.dumps({"ok": ok, "segments": results, "chain_start": start_seq,
                          "chain_start_note": start_note,
                          "chain": [i.__dict__ for i in issues]}, indent=2))
    else:
        for r in results:
            print(f"{'OK  ' if r['ok'] else 'FAIL'} {r['file']}  "
                  f"{('seq ' + str(r['seq'])) if r['ok'] else r['error']}")
        if start_note:
            print(start_note)
        for issue in issues:
            print(f"CHAIN {issue.kind} at seq {issue.seq}: {issue.detail}")
        print("all segments verified" if ok else "verification FAILED")
    return 0 if ok else 1


def refuse_non_regular(paths: list[Path]) -> None:
    """Bad input before any work: a path that exists but is not a regular file (exit 2)."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # reported per file by verify_command
        if not stat.S_ISREG(mode):
            with _open_regular(path):  # raises FormatError naming what it is
                pass
