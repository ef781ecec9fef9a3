"""Sealed segments: codec, age encryption, Ed25519 signature, hash-chained manifest, wire format.

The format is specified in ``docs/segment-format.md``. Modules, by job:
``canonical`` (the JSON that is signed), ``identity`` (device and age keys), ``codec`` (audio
files), ``manifest`` (schema), ``segment`` (sealing and the wire container), ``verify``
(signature, hash and chain checks).
"""

from appliance.seal.canonical import canonical_json
from appliance.seal.codec import CODECS, decode_audio, encode_audio
from appliance.seal.identity import (
    DeviceKey,
    generate_age_identity,
    key_id_for_public,
    load_age_identity,
    recipient_key_id,
    write_age_identity,
)
from appliance.seal.manifest import FIRST_SEQ, FORMAT, validate_manifest
from appliance.seal.segment import (
    SealedSegment,
    SegmentInput,
    decode_wire,
    encode_wire,
    seal_segment,
)
from appliance.seal.verify import (
    ChainIssue,
    audit_chain,
    open_segment_audio,
    open_segment_sensitive,
    verify_segment,
)

__all__ = [
    "CODECS",
    "FIRST_SEQ",
    "FORMAT",
    "ChainIssue",
    "DeviceKey",
    "SealedSegment",
    "SegmentInput",
    "audit_chain",
    "canonical_json",
    "decode_audio",
    "decode_wire",
    "encode_audio",
    "encode_wire",
    "generate_age_identity",
    "key_id_for_public",
    "load_age_identity",
    "open_segment_audio",
    "open_segment_sensitive",
    "recipient_key_id",
    "seal_segment",
    "validate_manifest",
    "verify_segment",
    "write_age_identity",
]
