from __future__ import annotations

import base64
import dataclasses
import json

import numpy as np
import pyrage
import pytest

from linerec_contract.canonical import canonical_json
from linerec_contract.errors import FormatError, VerificationError
from linerec_contract.identity import DeviceKey, generate_age_identity, recipient_key_id
from linerec_contract.segment import WIRE_HEADER, SealedSegment, decode_wire, encode_wire, seal_segment
from linerec_contract.verify import open_segment_audio, open_segment_sensitive, verify_segment

from .helpers import make_input, speechish

AgePair = tuple[str, str]


def _seal(key: DeviceKey, pair: AgePair, codec: str = "flac", **over: object) -> SealedSegment:
    return seal_segment(make_input(**over), device_id="box-1", seq=0, prev_manifest_sha256=None,
                        recipients=[pair[1]], key=key, codec=codec)


@pytest.mark.parametrize("codec", ["flac", "zstd-pcm"])
def test_round_trip_sample_exact(codec: str, device_key: DeviceKey, age_pair: AgePair) -> None:
    pcm = speechish(2.0, seed=3)
    first = seal_segment(make_input(pcm), device_id="box-1", seq=0, prev_manifest_sha256=None,
                         recipients=[age_pair[1]], key=device_key, codec=codec)
    seg = seal_segment(make_input(pcm, part=1), device_id="box-1", seq=1,
                       prev_manifest_sha256=first.manifest_sha256, recipients=[age_pair[1]],
                       key=device_key, codec=codec)
    back = decode_wire(encode_wire(seg))
    assert back == seg and back.manifest_sha256 == seg.manifest_sha256
    verify_segment(back, device_key.public_b64)
    out, rate = open_segment_audio(back, age_pair[0])
    assert rate == 8000
    np.testing.assert_array_equal(out, pcm)
    m = back.manifest
    assert m["frames"] == pcm.size and m["end_wall_ns"] - m["start_wall_ns"] == 2_000_000_000
    assert m["prev_manifest_sha256"] == first.manifest_sha256 and m["seq"] == 1
    assert m["recipients"] == [recipient_key_id(age_pair[1])]
    assert m["signing_key_id"] == device_key.key_id
    assert m["payload_bytes"] == len(seg.payload) and m["payload_sha256"] == seg.payload_sha256


def test_opus_round_trip(device_key: DeviceKey, age_pair: AgePair) -> None:
    seg = decode_wire(encode_wire(_seal(device_key, age_pair, "opus", pcm=speechish(1.0))))
    verify_segment(seg, device_key.public_b64)
    out, rate = open_segment_audio(seg, age_pair[0])
    assert rate == 8000 and abs(out.size - 8000) <= 960


def test_sensitive_only_sealed(device_key: DeviceKey, age_pair: AgePair) -> None:
    sensitive = {"dtmf": "4929123456781234", "dialled": "+4930123456", "n": 987654}
    seg = _seal(device_key, age_pair, sensitive=sensitive)
    blob = encode_wire(seg)
    for value in ("4929123456781234", "4930123456", "987654"):
        assert value.encode() not in seg.manifest_bytes
        assert value.encode() not in seg.signed_manifest_json()
        assert value.encode() not in blob
    assert open_segment_sensitive(seg, age_pair[0]) == sensitive


def test_sealed_meta_size_does_not_reveal_digit_count(device_key: DeviceKey,
                                                      age_pair: AgePair) -> None:
    sizes = set()
    for digits in ("123", "1234567890123456"):
        seg = _seal(device_key, age_pair, sensitive={"dtmf": digits})
        sealed = base64.b64decode(seg.manifest["sealed_meta"])
        sizes.add(len(pyrage.decrypt(sealed, [pyrage.x25519.Identity.from_str(age_pair[0])])))
    assert sizes == {256}


@pytest.mark.parametrize("field", ["call_id", "line"])
def test_sensitive_value_in_clear_field_is_refused(field: str, device_key: DeviceKey,
                                                   age_pair: AgePair) -> None:
    with pytest.raises(FormatError, match=field):
        _seal(device_key, age_pair, **{field: "call-4930123456"})


def test_sensitive_value_in_gap_is_refused(device_key: DeviceKey, age_pair: AgePair) -> None:
    with pytest.raises(FormatError, match="gaps"):
        _seal(device_key, age_pair, gaps=[{"reason": "x", "note": "4930123456"}])


def test_wrong_identity(device_key: DeviceKey, age_pair: AgePair) -> None:
    seg = _seal(device_key, age_pair)
    stranger, _ = generate_age_identity()
    with pytest.raises(FormatError, match="not encrypted to identity"):
        open_segment_audio(seg, stranger)
    with pytest.raises(FormatError, match="AGE-SECRET-KEY-1"):
        open_segment_sensitive(seg, "nonsense")


def test_verify_with_other_key_fails(device_key: DeviceKey, age_pair: AgePair) -> None:
    seg = _seal(device_key, age_pair)
    with pytest.raises(VerificationError, match="signed by"):
        verify_segment(seg, DeviceKey.generate().public_b64)


def test_forged_key_id_fails_signature(device_key: DeviceKey, age_pair: AgePair) -> None:
    other = DeviceKey.generate()
    seg = seal_segment(make_input(), device_id="box-1", seq=0, prev_manifest_sha256=None,
                       recipients=[age_pair[1]], key=other)
    manifest = dict(seg.manifest, signing_key_id=device_key.key_id)
    forged = dataclasses.replace(seg, manifest=manifest)
    with pytest.raises(VerificationError, match="signature does not verify"):
        verify_segment(forged, device_key.public_b64)


def test_every_byte_flip_is_detected(device_key: DeviceKey, age_pair: AgePair) -> None:
    """Exhaustive over a small segment's wire blob: header, signed manifest and payload."""
    seg = _seal(device_key, age_pair, "zstd-pcm", pcm=speechish(0.005), sensitive={})
    blob = encode_wire(seg)
    assert len(blob) < 4000
    outcomes = {"format": 0, "verify": 0}
    for pos in range(len(blob)):
        for mask in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= mask
            try:
                verify_segment(decode_wire(bytes(bad)), device_key.public_b64)
            except FormatError:
                outcomes["format"] += 1
            except VerificationError:
                outcomes["verify"] += 1
            else:
                pytest.fail(f"flipping byte {pos} with {mask:#x} went undetected")
    assert outcomes["verify"] > 0 and outcomes["format"] > 0


def test_manifest_dict_edit_is_detected(device_key: DeviceKey, age_pair: AgePair) -> None:
    seg = _seal(device_key, age_pair)
    for field, value in [("line", "line-2"), ("frames", 5), ("start_wall_ns", 1),
                         ("codec", "zstd-pcm"), ("gaps", [{"reason": "x"}])]:
        edited = dataclasses.replace(seg, manifest=dict(seg.manifest, **{field: value}))
        with pytest.raises(VerificationError):
            verify_segment(edited, device_key.public_b64)
    truncated = dataclasses.replace(seg, payload=seg.payload[:-1])
    with pytest.raises(VerificationError, match="payload is"):
        verify_segment(truncated, device_key.public_b64)


def test_schema_violation_reported_by_verify(device_key: DeviceKey, age_pair: AgePair) -> None:
    seg = _seal(device_key, age_pair)
    manifest = dict(seg.manifest, extra="x")
    signed = dataclasses.replace(seg, manifest=manifest,
                                 signature=device_key.sign(canonical_json(manifest)))
    with pytest.raises(VerificationError, match="unknown field 'extra'"):
        verify_segment(signed, device_key.public_b64)


def test_from_parts_rejects_non_canonical_and_bad_fields(device_key: DeviceKey,
                                                        age_pair: AgePair) -> None:
    seg = _seal(device_key, age_pair)
    doc = json.loads(seg.signed_manifest_json())
    assert SealedSegment.from_parts(seg.signed_manifest_json(), seg.payload) == seg
    with pytest.raises(FormatError, match="canonical"):
        SealedSegment.from_parts(json.dumps(doc, indent=1).encode(), seg.payload)
    cases = [
        ({**doc, "signature": "!!"}, "base64"),
        ({**doc, "signature": "AAAA"}, "64 bytes"),
        ({"manifest": doc["manifest"]}, "manifest and signature"),
        ({**doc, "manifest": {**doc["manifest"], "format": "rec-segment/2"}}, "rec-segment/1"),
        ({**doc, "manifest": {**doc["manifest"], "seq": -1}}, "'seq'"),
        ({**doc, "manifest": {**doc["manifest"], "codec": "mp3"}}, "'codec'"),
        ({**doc, "manifest": {**doc["manifest"], "seq": 3}}, "prev_manifest_sha256"),
    ]
    for bad, match in cases:
        with pytest.raises(FormatError, match=match):
            SealedSegment.from_parts(canonical_json(bad), seg.payload)


def test_decode_wire_errors_are_one_line(device_key: DeviceKey, age_pair: AgePair) -> None:
    blob = encode_wire(_seal(device_key, age_pair))
    cases = [b"", b"RSEG", b"XSEG" + blob[4:], blob[:4] + b"\x02" + blob[5:], blob + b"x",
             blob[:-1], blob[:5] + b"\x01" + blob[6:]]
    for bad in cases:
        with pytest.raises(FormatError) as err:
            decode_wire(bad)
        assert "\n" not in str(err.value)
    assert WIRE_HEADER.size == 20


def test_key_rotation_announcement(device_key: DeviceKey, age_pair: AgePair) -> None:
    nxt = DeviceKey.generate()
    seg = seal_segment(make_input(), device_id="box-1", seq=0, prev_manifest_sha256=None,
                       recipients=[age_pair[1]], key=device_key, next_key=nxt)
    assert seg.manifest["next_signing_key"] == {"key_id": nxt.key_id, "public_b64": nxt.public_b64}
    verify_segment(decode_wire(encode_wire(seg)), device_key.public_b64)


def test_bad_recipient_and_gap_rejected(device_key: DeviceKey) -> None:
    with pytest.raises(FormatError, match="age1"):
        seal_segment(make_input(), device_id="box-1", seq=0, prev_manifest_sha256=None,
                     recipients=["age1nope"], key=device_key)
    with pytest.raises(FormatError, match="at least one"):
        seal_segment(make_input(), device_id="box-1", seq=0, prev_manifest_sha256=None,
                     recipients=[], key=device_key)
    _, rec = generate_age_identity()
    with pytest.raises(FormatError, match="reason"):
        seal_segment(make_input(gaps=[{"frames": 3}]), device_id="box-1", seq=0,
                     prev_manifest_sha256=None, recipients=[rec], key=device_key)
    with pytest.raises(FormatError, match="device_id"):
        seal_segment(make_input(), device_id="bad/id", seq=0, prev_manifest_sha256=None,
                     recipients=[rec], key=device_key)
