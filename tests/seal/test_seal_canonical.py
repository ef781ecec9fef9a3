from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linerec_contract.canonical import canonical_json, parse_canonical
from linerec_contract.errors import FormatError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def test_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()


@pytest.mark.parametrize("bad", [1.5, math.nan, math.inf, {"x": 0.0}, [b"bytes"], {1: "k"}, 2**63])
def test_rejects_non_canonical_values(bad: object) -> None:
    with pytest.raises(FormatError):
        canonical_json(bad)


@given(json_values)
def test_parse_round_trip(value: object) -> None:
    data = canonical_json(value)
    assert parse_canonical(data, "x") == json.loads(data)
    assert canonical_json(parse_canonical(data, "x")) == data


@pytest.mark.parametrize(
    "text",
    [b'{"b":1,"a":2}', b'{"a": 1}', b'{"a":1,"a":1}', b'{"a":1.0}', b'{"a":NaN}', b'"\\u0041"',
     b"[" * 5000 + b"]" * 5000, b"\xff", b'{"a":' + b"9" * 5000 + b"}"],
)
def test_parse_rejects_non_canonical_text(text: bytes) -> None:
    with pytest.raises(FormatError):
        parse_canonical(text, "x")
