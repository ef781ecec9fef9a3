"""Sealing a segment, and the wire container that carries it to central.

``seal_segment`` turns one :class:`SegmentInput` into a :class:`SealedSegment`: the audio file
(see :mod:`linerec_contract.codec`) encrypted with age to every recipient, a manifest that names
it by SHA-256 and links to the previous manifest, and the device's Ed25519 signature over the
manifest's canonical JSON. ``encode_wire``/``decode_wire`` are the one place where the outbox
file and MQTT payload layout lives (``docs/segment-format.md``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyrage

from linerec_contract.canonical import canonical_json, parse_canonical
from linerec_contract.codec import OPUS_COMPLEXITY, check_pcm, encode_audio
from linerec_contract.errors import FormatError
from linerec_contract.identity import DeviceKey, parse_recipient, recipient_key_id
from linerec_contract.manifest import (
    FORMAT,
    check_gap,
    sensitive_leaves,
    validate_manifest,
)

WIRE_MAGIC = b"RSEG"
WIRE_VERSION = 1
# magic, version, flags (0), reserved (0), signed-manifest length, payload length; big-endian.
WIRE_HEADER = struct.Struct(">4sBBHIQ")
MAX_SIGNED_MANIFEST = 256 * 1024
SEALED_META_BLOCK = 256  # sealed_meta plaintext is padded to a multiple of this many bytes


@dataclass(frozen=True)
class SegmentInput:
    """One part of one call on one line, as the recorder hands it to the sealer."""

    line: str
    call_id: str
    part: int
    last_part: bool
    start_frame: int
    start_wall_ns: int
    rate: int
    pcm: np.ndarray
    sensitive: dict[str, Any]
    gaps: list[dict[str, Any]]


@dataclass(frozen=True)
class SealedSegment:
    """A signed manifest plus its age-encrypted audio payload."""

    manifest: dict[str, Any]
    signature: bytes
    payload: bytes

    @property
    def seq(self) -> int:
        return int(self.manifest["seq"])

    @property
    def device_id(self) -> str:
        return str(self.manifest["device_id"])

    @property
    def manifest_bytes(self) -> bytes:
        return canonical_json(self.manifest)

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @functools.cached_property
    def payload_sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    @property
    def payload_size(self) -> int:
        return len(self.payload)

    def signed_manifest_json(self) -> bytes:
        """Canonical ``{"manifest": {...}, "signature": "<base64>"}`` as stored at central."""
        signature = base64.b64encode(self.signature).decode("ascii")
        return canonical_json({"manifest": self.manifest, "signature": signature})

    @classmethod
    def from_parts(cls, signed_manifest_json: bytes, payload: bytes) -> SealedSegment:
        """Rebuild a segment from its stored parts; FormatError if the manifest is malformed."""
        if not isinstance(signed_manifest_json, bytes | bytearray) or not isinstance(
            payload, bytes | bytearray
        ):
            raise FormatError("signed manifest and payload must be bytes")
        if len(signed_manifest_json) > MAX_SIGNED_MANIFEST:
            raise FormatError(
                f"signed manifest is {len(signed_manifest_json)} bytes; "
                f"at most {MAX_SIGNED_MANIFEST} accepted"
            )
        doc = parse_canonical(bytes(signed_manifest_json), "signed manifest")
        if not isinstance(doc, dict) or set(doc) != {"manifest", "signature"}:
            raise FormatError("signed manifest must be an object of manifest and signature only")
        sig_text = doc["signature"]
        try:
            if not isinstance(sig_text, str):
                raise ValueError("not a string")
            signature = base64.b64decode(sig_text.encode("ascii"), validate=True)
        except (ValueError, binascii.Error, UnicodeEncodeError) as err:
            raise FormatError("signed manifest field 'signature' is not base64 text") from err
        if base64.b64encode(signature).decode("ascii") != sig_text:
            raise FormatError("signed manifest field 'signature' is not canonical base64")
        if len(signature) != 64:
            raise FormatError(
                f"signature decodes to {len(signature)} bytes; Ed25519 signatures are 64 bytes"
            )
        validate_manifest(doc["manifest"])
        return cls(manifest=doc["manifest"], signature=signature, payload=bytes(payload))


def _check_input(inp: SegmentInput, codec: str) -> None:
    check_pcm(inp.pcm, inp.rate, codec)
    for name in ("line", "call_id"):
        value = getattr(inp, name)
        if not isinstance(value, str) or not 1 <= len(value) <= 128:
            raise FormatError(f"segment {name} {str(value)[:40]!r} must be 1..128 characters")
    for name in ("part", "start_frame", "start_wall_ns"):
        value = getattr(inp, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FormatError(f"segment {name} {value!r} must be a non-negative integer")
    if not isinstance(inp.last_part, bool):
        raise FormatError("segment last_part must be true or false")
    if not isinstance(inp.sensitive, dict):
        raise FormatError("segment sensitive must be a dict (it is sealed, never in the clear)")
    if not isinstance(inp.gaps, list):
        raise FormatError("segment gaps must be a list of gap records")


def _check_no_leak(inp: SegmentInput) -> None:
    clear = {"line": inp.line, "call_id": inp.call_id, "gaps": canonical_json(inp.gaps).decode()}
    for leaf in sensitive_leaves(inp.sensitive):
        for field, text in clear.items():
            if leaf in text:
                raise FormatError(
                    f"a sensitive value appears in the clear field {field!r}; digits and numbers "
                    "belong only in SegmentInput.sensitive"
                )


def _seal_meta(sensitive: dict[str, Any], recipients: list[pyrage.x25519.Recipient]) -> str:
    body = canonical_json({"pad": "", "sensitive": sensitive})
    pad = -len(body) % SEALED_META_BLOCK
    plain = canonical_json({"pad": " " * pad, "sensitive": sensitive})
    return base64.b64encode(pyrage.encrypt(plain, recipients)).decode("ascii")


def seal_segment(
    inp: SegmentInput,
    *,
    device_id: str,
    seq: int,
    prev_manifest_sha256: str | None,
    recipients: list[str],
    key: DeviceKey,
    codec: str = "flac",
    opus_bitrate: int = 16000,
    opus_complexity: int = OPUS_COMPLEXITY,
    next_key: DeviceKey | None = None,
    created_wall_ns: int | None = None,
) -> SealedSegment:
    """Encode, encrypt, describe and sign one segment.

    ``next_key`` announces a rotation: segments after this one may be signed by that key.
    """
    _check_input(inp, codec)
    if not recipients:
        raise FormatError("no recipients; at least one age1... central key is needed")
    parsed = [parse_recipient(r) for r in recipients]
    for index, gap in enumerate(inp.gaps):
        problem = check_gap(gap, seq)
        if problem:
            raise FormatError(f"segment gaps[{index}] {problem}")
    _check_no_leak(inp)

    audio = encode_audio(inp.pcm, inp.rate, codec, opus_bitrate=opus_bitrate,
                         opus_complexity=opus_complexity)
    payload = pyrage.encrypt(audio, parsed)
    frames = int(inp.pcm.size)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "device_id": device_id,
        "seq": seq,
        "line": inp.line,
        "call_id": inp.call_id,
        "part": inp.part,
        "last_part": inp.last_part,
        "start_frame": inp.start_frame,
        "frames": frames,
        "start_wall_ns": inp.start_wall_ns,
        "end_wall_ns": inp.start_wall_ns + frames * 1_000_000_000 // inp.rate,
        "sample_rate": inp.rate,
        "channels": 1,
        "codec": codec,
        "audio_bytes": len(audio),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "prev_manifest_sha256": prev_manifest_sha256,
        "recipients": [recipient_key_id(r) for r in recipients],
        "signing_key_id": key.key_id,
        "sealed_meta": _seal_meta(inp.sensitive, parsed),
        "gaps": inp.gaps,
        "created_wall_ns": time.time_ns() if created_wall_ns is None else created_wall_ns,
    }
    if next_key is not None:
        announce = {"key_id": next_key.key_id, "public_b64": next_key.public_b64}
        manifest["next_signing_key"] = announce
    validate_manifest(manifest)  # a sealer bug must not produce a segment central rejects
    return SealedSegment(manifest=manifest, signature=key.sign(canonical_json(manifest)),
                         payload=payload)


def encode_wire(seg: SealedSegment) -> bytes:
    """One blob for the outbox file and the MQTT payload (layout in docs/segment-format.md)."""
    signed = seg.signed_manifest_json()
    header = WIRE_HEADER.pack(WIRE_MAGIC, WIRE_VERSION, 0, 0, len(signed), len(seg.payload))
    return header + signed + seg.payload


def _check_header(header: bytes, size: int) -> tuple[int, int]:
    """(manifest length, payload length) from a wire header of a ``size``-byte blob."""
    if size < WIRE_HEADER.size:
        raise FormatError(
            f"segment blob is {size} bytes; shorter than its {WIRE_HEADER.size}-byte header"
        )
    magic, version, flags, reserved, mlen, plen = WIRE_HEADER.unpack_from(header)
    if magic != WIRE_MAGIC:
        raise FormatError(f"segment blob starts with {magic!r}; expected {WIRE_MAGIC!r}")
    if version != WIRE_VERSION:
        raise FormatError(f"segment blob version {version} is unsupported; accepted {WIRE_VERSION}")
    if flags or reserved:
        raise FormatError("segment blob has non-zero reserved header bytes")
    if mlen > MAX_SIGNED_MANIFEST:
        raise FormatError(f"segment blob manifest length {mlen} exceeds {MAX_SIGNED_MANIFEST}")
    expected = WIRE_HEADER.size + mlen + plen
    if size != expected:
        raise FormatError(
            f"segment blob is {size} bytes; its header announces {expected} "
            "(truncated or trailing bytes)"
        )
    return mlen, plen


def read_wire_file(path: Path) -> SealedSegment:
    """:func:`decode_wire` of a file, holding its payload in memory once (not twice)."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mlen, plen = _check_header(fh.read(WIRE_HEADER.size), size)
        signed = fh.read(mlen)
        payload = fh.read(plen)
    if len(signed) != mlen or len(payload) != plen:
        raise FormatError(f"{path.name}: segment file changed while it was read")
    return SealedSegment.from_parts(signed, payload)


COPY_BLOCK = 1024 * 1024  # bytes held at once while a payload is copied and hashed


@dataclass(frozen=True)
class PayloadFile:
    """A payload kept in a file of its own (durable: fsynced), with its measured SHA-256."""

    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class SpooledSegment(SealedSegment):
    """A segment whose payload stays on disk (``source``): ``payload`` is empty and never
    used; ``payload_sha256`` and ``payload_size`` are measured from the file."""

    source: PayloadFile | None = None

    @functools.cached_property
    def payload_sha256(self) -> str:
        return self._source.sha256

    @property
    def payload_size(self) -> int:
        return self._source.size

    @property
    def _source(self) -> PayloadFile:
        if self.source is None:
            raise FormatError("spooled segment without its payload file")
        return self.source


def spool_wire_file(path: Path, payload_out: Path | None) -> SpooledSegment:
    """Parse a wire file's header and signed manifest; hash its payload block by block
    (:data:`COPY_BLOCK` bytes at a time, never whole in memory), copying it to
    ``payload_out`` (fsynced) when given. FormatError as :func:`decode_wire`."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mlen, plen = _check_header(fh.read(WIRE_HEADER.size), size)
        signed = fh.read(mlen)
        if len(signed) != mlen:
            raise FormatError(f"{path.name}: segment file changed while it was read")
        seg = SealedSegment.from_parts(signed, b"")
        out = payload_out.open("xb") if payload_out is not None else None
        try:
            left = plen
            while left:
                block = fh.read(min(COPY_BLOCK, left))
                if not block:
                    raise FormatError(f"{path.name}: segment file changed while it was read")
                digest.update(block)
                if out is not None:
                    out.write(block)
                left -= len(block)
            if out is not None:
                out.flush()
                # Durability: the payload file may become the stored object (linked), so it
                # is on disk before the store names it.
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
    source = PayloadFile(payload_out if payload_out is not None else path, plen,
                         digest.hexdigest())
    return SpooledSegment(manifest=seg.manifest, signature=seg.signature, payload=b"",
                          source=source)


def decode_wire(data: bytes) -> SealedSegment:
    """Parse a blob from :func:`encode_wire`; FormatError with a one-line reason otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(f"segment blob must be bytes, got {type(data).__name__}")
    data = bytes(data)
    mlen, _plen = _check_header(data[:WIRE_HEADER.size], len(data))
    start = WIRE_HEADER.size
    return SealedSegment.from_parts(data[start:start + mlen], data[start + mlen:])
