"""Property tests: malformed input raises FormatError (or VerificationError), nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linerec_contract.canonical import canonical_json
from linerec_contract.errors import FormatError, VerificationError
from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import SealedSegment, decode_wire, encode_wire, seal_segment
from linerec_contract.verify import verify_segment

from .helpers import make_input, speechish

KEY = DeviceKey.generate()
_, RECIPIENT = generate_age_identity()
SEG = seal_segment(make_input(speechish(0.01)), device_id="box-1", seq=0,
                   prev_manifest_sha256=None, recipients=[RECIPIENT], key=KEY, codec="zstd-pcm")
BLOB = encode_wire(SEG)
SIGNED = SEG.signed_manifest_json()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=3),
    max_leaves=10,
)


def _check(blob: bytes) -> None:
    try:
        seg = decode_wire(blob)
    except FormatError as err:
        assert "\n" not in str(err)
        return
    if blob == BLOB:
        verify_segment(seg, KEY.public_b64)
        return
    with pytest.raises(VerificationError):
        verify_segment(seg, KEY.public_b64)


@FUZZ
@given(st.binary(max_size=400))
def test_decode_wire_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.binary(max_size=300))
def test_decode_wire_arbitrary_bytes_after_valid_header(tail: bytes) -> None:
    _check(BLOB[:20] + tail)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(BLOB) - 1), st.integers(0, 255)), min_size=1,
                max_size=6),
       st.integers(0, len(BLOB)), st.binary(max_size=4), st.integers(0, 2))
def test_decode_wire_mutated_valid_blob(edits: list[tuple[int, int]], cut: int, insert: bytes,
                                        how: int) -> None:
    blob = bytearray(BLOB)
    for pos, value in edits:
        blob[pos] = value
    if how == 1:
        blob = blob[:cut]
    elif how == 2:
        blob[cut:cut] = insert
    _check(bytes(blob))


@FUZZ
@given(st.binary(max_size=300), st.binary(max_size=50))
def test_from_parts_arbitrary_bytes(manifest: bytes, payload: bytes) -> None:
    try:
        SealedSegment.from_parts(manifest, payload)
    except FormatError:
        return
    pytest.fail("arbitrary bytes were accepted as a signed manifest")


@FUZZ
@given(st.sampled_from(sorted(SEG.manifest)), json_values)
def test_from_parts_field_replaced(field: str, value: Any) -> None:
    doc = json.loads(SIGNED)
    doc["manifest"][field] = value
    try:
        text = canonical_json(doc)
    except FormatError:
        text = json.dumps(doc).encode()
    try:
        seg = SealedSegment.from_parts(text, SEG.payload)
    except FormatError:
        return
    if seg.manifest != SEG.manifest:
        with pytest.raises(VerificationError):
            verify_segment(seg, KEY.public_b64)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=4))
def test_from_parts_extra_or_wrong_top_level(doc: dict[str, Any]) -> None:
    try:
        text = canonical_json(doc)
    except FormatError:
        text = json.dumps(doc).encode()
    with pytest.raises(FormatError):
        SealedSegment.from_parts(text, SEG.payload)
