"""Checking sealed segments: one segment's signature and hashes, and a device's whole chain.

``verify_segment`` needs only the device's public key. ``open_segment_*`` need a central age
identity. ``audit_chain`` walks every segment of every device in seq order and reports gaps,
duplicates, replays, broken links and bad signatures as :class:`ChainIssue` records.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyrage

from linerec_contract.canonical import canonical_json, parse_canonical
from linerec_contract.codec import decode_audio
from linerec_contract.errors import FormatError, VerificationError
from linerec_contract.identity import (
    key_id_for_public,
    parse_age_identity,
    recipient_key_id,
    recipient_of,
    verify_signature,
)
from linerec_contract.manifest import FIRST_SEQ, validate_manifest
from linerec_contract.segment import SealedSegment
from linerec_contract.trust import DeviceTrust, UntrustedKey

LOSSLESS = ("flac", "zstd-pcm")


def _name(seg: SealedSegment) -> str:
    try:
        return f"segment {seg.device_id}/{seg.seq}"
    except (KeyError, TypeError, ValueError):
        return "segment"


def _check_schema(seg: SealedSegment) -> None:
    try:
        validate_manifest(seg.manifest)
    except FormatError as err:
        raise VerificationError(f"{_name(seg)}: {err}") from err


def _check_signature(seg: SealedSegment, public_b64: str) -> None:
    try:
        key_id = key_id_for_public(public_b64)
    except FormatError as err:
        raise VerificationError(f"{_name(seg)}: checking key is unusable: {err}") from err
    if seg.manifest["signing_key_id"] != key_id:
        raise VerificationError(
            f"{_name(seg)} is signed by {seg.manifest['signing_key_id']}, "
            f"not by the key given ({key_id})"
        )
    if not verify_signature(public_b64, seg.signature, canonical_json(seg.manifest)):
        raise VerificationError(f"{_name(seg)}: manifest signature does not verify with {key_id}")


def _check_payload(seg: SealedSegment) -> None:
    # A spooled segment's payload was hashed from its file (payload_sha256 measures it).
    check_payload_digest(seg, seg.payload_size, seg.payload_sha256)


def verify_manifest(seg: SealedSegment, public_b64: str) -> None:
    """Schema and signature only: the payload is checked by :func:`check_payload_digest`
    (for payloads hashed while they are read, never held in memory)."""
    _check_schema(seg)
    _check_signature(seg, public_b64)


def check_payload_digest(seg: SealedSegment, size: int, digest: str) -> None:
    """The payload's size and SHA-256, measured elsewhere, against the signed manifest."""
    wanted = seg.manifest["payload_bytes"]
    if size != wanted:
        raise VerificationError(f"{_name(seg)}: payload is {size} bytes, manifest says {wanted}")
    if digest != seg.manifest["payload_sha256"]:
        raise VerificationError(
            f"{_name(seg)}: payload SHA-256 {digest[:16]}... differs from the manifest's "
            f"{seg.manifest['payload_sha256'][:16]}..."
        )


def verify_segment(seg: SealedSegment, public_b64: str) -> None:
    """Check schema, signature and payload hash; VerificationError naming what failed."""
    _check_schema(seg)
    _check_signature(seg, public_b64)
    _check_payload(seg)


def verify_trusted(seg: SealedSegment, trust: DeviceTrust) -> None:
    """Check ``seg`` with the key ``trust`` allows for its device and seq (see
    :mod:`linerec_contract.trust`); VerificationError (UntrustedKey for the key) naming what
    failed."""
    _check_schema(seg)
    if seg.device_id != trust.device_id:
        raise UntrustedKey(
            f"{_name(seg)} is checked against the keys of device {trust.device_id}; a device's "
            "keys never sign another device's segments"
        )
    public = trust.public_key(str(seg.manifest["signing_key_id"]), seg.seq)
    _check_signature(seg, public)
    _check_payload(seg)


def _decrypt(seg: SealedSegment, data: bytes, identity: str, what: str) -> bytes:
    ident = parse_age_identity(identity)
    own = recipient_key_id(recipient_of(identity))
    if own not in seg.manifest.get("recipients", []):
        raise FormatError(
            f"{_name(seg)} is not encrypted to identity {own}; its recipients are "
            f"{', '.join(seg.manifest.get('recipients', []))}"
        )
    try:
        return bytes(pyrage.decrypt(data, [ident]))
    except pyrage.DecryptError as err:
        raise VerificationError(f"{_name(seg)}: {what} does not decrypt: {err}") from err


def open_segment_audio(seg: SealedSegment, identity: str) -> tuple[np.ndarray, int]:
    """Decrypt and decode the audio; checks the payload hash and the manifest's rate and size."""
    _check_schema(seg)
    _check_payload(seg)
    audio = _decrypt(seg, seg.payload, identity, "payload")
    manifest = seg.manifest
    if len(audio) != manifest["audio_bytes"]:
        raise VerificationError(
            f"{_name(seg)}: audio is {len(audio)} bytes, manifest says {manifest['audio_bytes']}"
        )
    try:
        pcm, rate = decode_audio(audio, manifest["codec"])
    except FormatError as err:
        raise VerificationError(f"{_name(seg)}: {err}") from err
    if rate != manifest["sample_rate"]:
        raise VerificationError(
            f"{_name(seg)}: audio is at {rate} Hz, manifest says {manifest['sample_rate']}"
        )
    if manifest["codec"] in LOSSLESS and pcm.size != manifest["frames"]:
        raise VerificationError(
            f"{_name(seg)}: audio has {pcm.size} frames, manifest says {manifest['frames']}"
        )
    return pcm, rate


def open_segment_sensitive(seg: SealedSegment, identity: str) -> dict[str, Any]:
    """Decrypt the sealed metadata (DTMF digits, numbers...) of ``seg``."""
    _check_schema(seg)
    try:
        sealed = base64.b64decode(seg.manifest["sealed_meta"], validate=True)
    except binascii.Error as err:  # schema already checked; kept for a clear message
        raise VerificationError(f"{_name(seg)}: sealed_meta is not base64") from err
    plain = _decrypt(seg, sealed, identity, "sealed_meta")
    try:
        doc = parse_canonical(plain, "sealed_meta")
    except FormatError as err:
        raise VerificationError(f"{_name(seg)}: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("sensitive"), dict):
        raise VerificationError(f"{_name(seg)}: sealed_meta does not hold a 'sensitive' object")
    sensitive: dict[str, Any] = doc["sensitive"]
    return sensitive


@dataclass(frozen=True)
class ChainIssue:
    """One finding of :func:`audit_chain`."""

    kind: str  # gap | duplicate | bad-link | bad-signature | bad-hash | reordered | replay
    seq: int
    detail: str


def _key_check(seg: SealedSegment, trust: DeviceTrust | None) -> str | None:
    """Why ``seg``'s signature cannot be trusted, or None."""
    try:
        validate_manifest(seg.manifest)
    except FormatError as err:
        return f"manifest is not a valid {seg.manifest.get('format', 'manifest')}: {err}"
    if trust is None:
        return f"device {seg.device_id} is not enrolled: no key may sign its segments"
    try:
        public = trust.public_key(seg.manifest["signing_key_id"], seg.seq)
        _check_signature(seg, public)
    except VerificationError as err:
        return str(err)
    return None


def _gap_reason(start: int, end: int, later: list[SealedSegment]) -> str:
    """The reason the box announced for losing seqs start..end, from later manifests' gaps."""
    for seg in later:
        for gap in seg.manifest["gaps"]:
            lost = gap.get("lost_seq")
            if isinstance(lost, list) and lost[0] <= end and lost[1] >= start:
                return f"announced by the box in seq {seg.seq}: {gap['reason']}"
    return "not announced by the box: removed or lost after sealing"


def _audit_device(
    device: str, segs: list[SealedSegment], trust: DeviceTrust | None, start_seq: int | None,
    check_payloads: bool = True,
) -> list[ChainIssue]:
    issues: list[ChainIssue] = []
    trusted: dict[int, list[SealedSegment]] = defaultdict(list)
    by_hash: dict[str, int] = {}
    for seg in sorted(segs, key=lambda s: s.seq):
        seq = seg.seq
        problem = _key_check(seg, trust)
        if problem:
            issues.append(ChainIssue("bad-signature", seq, f"{device}/{seq}: {problem}"))
            continue
        digest = seg.manifest_sha256
        if digest in by_hash:
            issues.append(ChainIssue(
                "replay", seq, f"{device}/{seq}: an exact copy of a segment already present"))
            continue
        if trusted[seq]:
            issues.append(ChainIssue(
                "duplicate", seq,
                f"{device}/{seq}: {len(trusted[seq]) + 1} different manifests claim this seq"))
        try:
            if check_payloads:
                _check_payload(seg)
        except VerificationError as err:
            issues.append(ChainIssue("bad-hash", seq, str(err)))
        trusted[seq].append(seg)
        by_hash[digest] = seq
        rotation = trust.announcement(seg.manifest) if trust is not None else None
        if trust is not None and rotation is not None:
            trust = trust.with_rotation(rotation)
    if not trusted:
        return issues
    seqs = sorted(trusted)
    expected = seqs[0] if start_seq is None else start_seq
    for index, seq in enumerate(seqs):
        if seq > expected:
            later = [s for q in seqs[index:] for s in trusted[q]]
            reason = _gap_reason(expected, seq - 1, later)
            count = seq - expected
            issues.append(ChainIssue(
                "gap", expected,
                f"{device}: {count} segment(s) {expected}..{seq - 1} missing; {reason}"))
        expected = seq + 1
        for seg in trusted[seq]:
            _check_link(device, seg, trusted, by_hash, issues)
    return sorted(issues, key=lambda i: (i.seq, i.kind))


def _check_link(
    device: str, seg: SealedSegment, trusted: dict[int, list[SealedSegment]],
    by_hash: dict[str, int], issues: list[ChainIssue],
) -> None:
    seq, prev = seg.seq, seg.manifest["prev_manifest_sha256"]
    if seq == FIRST_SEQ or not trusted.get(seq - 1):
        return  # first segment (schema forces prev null), or predecessor missing (a gap)
    if any(p.manifest_sha256 == prev for p in trusted[seq - 1]):
        return
    if prev in by_hash:
        issues.append(ChainIssue(
            "reordered", seq,
            f"{device}/{seq}: links to seq {by_hash[prev]} instead of seq {seq - 1}"))
    else:
        issues.append(ChainIssue(
            "bad-link", seq,
            f"{device}/{seq}: prev_manifest_sha256 {str(prev)[:16]}... matches no manifest of "
            f"seq {seq - 1}"))


def audit_chain(
    segments: Iterable[SealedSegment], trust: Mapping[str, DeviceTrust], *,
    start_seq: int | None = FIRST_SEQ, check_payloads: bool = True,
) -> list[ChainIssue]:
    """Audit the chains of all devices in ``segments`` (any order), each against its own keys.

    ``trust`` maps device id to the :class:`DeviceTrust` of that device; a device missing from
    it has no trusted key. Rotations announced in a trusted manifest (``next_signing_key``) are
    learnt while walking the chain in seq order (see :mod:`linerec_contract.trust`).
    ``start_seq`` is the seq the chain must start at (None: start at the lowest present).
    ``check_payloads=False``: the caller verified the payloads already (streamed).
    """
    by_device: dict[str, list[SealedSegment]] = defaultdict(list)
    issues: list[ChainIssue] = []
    for seg in segments:
        try:
            device = seg.device_id
            _ = seg.seq
        except (KeyError, TypeError, ValueError):
            issues.append(ChainIssue("bad-signature", -1, "segment manifest has no device_id/seq"))
            continue
        by_device[device].append(seg)
    for device in sorted(by_device):
        issues.extend(_audit_device(device, by_device[device], trust.get(device), start_seq,
                                    check_payloads))
    return issues
