"""Every field of every message is checked against docs/protocol.md before use (fuzzed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linerec_contract.errors import FormatError
from linerec_contract.manifest import MAX_SEQ
from linerec_contract.protocol import (
    CHUNK_PROP,
    CHUNK_SHA_PROP,
    CHUNK_SIZE_PROP,
    HTTPS_PATH_RE,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_SEGMENT_BYTES,
    Ack,
    ChunkInfo,
    LossEvent,
    Status,
    parse_segment_topic,
    segment_topic,
)

SHA = "ab" * 32
# Characters str.isdigit() and int() accept although they are no ASCII digits.
NOT_ASCII_DIGITS = ["\u00b2", "\u0663", "\u0967", "\uff11", "\U0001d7d9"]


@pytest.mark.parametrize("seq_text", [*NOT_ASCII_DIGITS, "1\u00b2", "-1", "+1", " 1", "1 ", "1\n",
                                      "01", "1_0", "0x1", "", str(MAX_SEQ + 1), "9" * 40])
def test_segment_topic_refuses_what_is_not_a_documented_seq(seq_text: str) -> None:
    with pytest.raises(FormatError):
        parse_segment_topic(f"rec/v1/box-1/seg/{seq_text}")


@pytest.mark.parametrize("topic", ["rec/v1/box-1\n/seg/1", "rec/v1//seg/1", "rec/v1/../seg/1",
                                   "rec/v2/box-1/seg/1", "rec/v1/box-1/seg/1/x",
                                   "rec/v1/box-1/ack", "rec/v1/" + "b" * 64 + "/seg/1"])
def test_segment_topic_refuses_malformed_names(topic: str) -> None:
    with pytest.raises(FormatError):
        parse_segment_topic(topic)


def test_segment_topic_bounds() -> None:
    assert parse_segment_topic("rec/v1/box-1/seg/0") == ("box-1", 0)
    assert parse_segment_topic(f"rec/v1/box-1/seg/{MAX_SEQ}") == ("box-1", MAX_SEQ)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"rec/v1/[a-z0-9\u00b2\n._-]{0,8}/seg/.{0,14}",
                                             fullmatch=True))
def test_segment_topic_fuzz(topic: str) -> None:
    try:
        dev, seq = parse_segment_topic(topic)
    except FormatError:
        return
    assert 0 <= seq <= MAX_SEQ and segment_topic(dev, seq) == topic  # one spelling only


def _props(index: str, count: str, sha: str = SHA, size: str = "1000") -> list[tuple[str, str]]:
    return [(CHUNK_PROP, f"{index}/{count}"), (CHUNK_SHA_PROP, sha), (CHUNK_SIZE_PROP, size)]


@pytest.mark.parametrize("props", [
    _props("\u00b2", "3"), _props("0", "\u00b2"), _props("-1", "3"), _props("3", "3"),
    _props("0", "0"), _props("0", str(MAX_CHUNKS + 1)), _props("0", "99999999999999999999"),
    _props("0", "3", size="0"), _props("0", "3", size=str(MAX_SEGMENT_BYTES + 1)),
    _props("0", "3", size="\u0663"), _props("0", "3", sha="AB" * 32), _props("0", "3", sha="x"),
    _props("0", "4", size="3"),  # four chunks of at least one byte cannot make three bytes
    _props("0", "2", size=str(2 * MAX_CHUNK_BYTES + 1)),  # chunks larger than the maximum
    [(CHUNK_PROP, "0/3")],  # the others missing
    [*_props("0", "3"), (CHUNK_PROP, "1/3")],  # a property twice
    [(CHUNK_PROP, "0-3"), (CHUNK_SHA_PROP, SHA), (CHUNK_SIZE_PROP, "10")],
])
def test_chunk_properties_refused(props: list[tuple[str, str]]) -> None:
    with pytest.raises(FormatError):
        ChunkInfo.from_user_properties(props)


def test_chunk_properties_accepted() -> None:
    assert ChunkInfo.from_user_properties(None) is None
    assert ChunkInfo.from_user_properties([("other", "x")]) is None
    info = ChunkInfo.from_user_properties(_props("2", "3"))
    assert info == ChunkInfo(2, 3, SHA, 1000)
    assert ChunkInfo.from_user_properties(info.user_properties()) == info


prop_text = st.text(max_size=12) | st.sampled_from(["0", "1", "3", *NOT_ASCII_DIGITS, "-1"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([CHUNK_PROP, CHUNK_SHA_PROP, CHUNK_SIZE_PROP, "x"]),
                          st.one_of(prop_text, st.builds(lambda a, b: f"{a}/{b}", prop_text,
                                                         prop_text), st.just(SHA))),
                max_size=5))
def test_chunk_properties_fuzz(props: list[tuple[str, str]]) -> None:
    try:
        info = ChunkInfo.from_user_properties(props)
    except FormatError:
        return
    if info is not None:
        assert 0 <= info.index < info.count <= MAX_CHUNKS
        assert info.count <= info.blob_bytes <= min(MAX_SEGMENT_BYTES, info.count * MAX_CHUNK_BYTES)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.builds(
    lambda fields: json.dumps({"v": 1, **fields}).encode(),
    st.dictionaries(st.sampled_from(["seq", "sha256", "result", "reason", "state", "version",
                                     "boot_id", "session", "ts", "kind", "first_seq",
                                     "last_seq"]), json_values, max_size=8)))
def test_control_messages_fuzz(payload: bytes) -> None:
    for cls in (Ack, Status, LossEvent):
        try:
            msg = cls.decode(payload)
        except FormatError:
            continue
        assert cls.decode(msg.encode()) == msg


def test_ack_seq_beyond_the_maximum_is_refused() -> None:
    good = Ack(MAX_SEQ, SHA, "stored")
    assert Ack.decode(good.encode()) == good
    bad = json.dumps({"v": 1, "seq": MAX_SEQ + 1, "sha256": SHA, "result": "stored"}).encode()
    with pytest.raises(FormatError):
        Ack.decode(bad)


@pytest.mark.parametrize("path", ["/v1/box-1/seg/\u00b2", "/v1/box-1/seg/\u0663", "/v1/box-1/seg/01",
                                  "/v1/box-1/seg/1\n", "/v1/box-1\n/seg/1",
                                  "/v1/box-1/seg/1000000000000"])
def test_https_path_refuses_non_ascii_digits_and_odd_spellings(path: str) -> None:
    assert HTTPS_PATH_RE.match(path) is None
