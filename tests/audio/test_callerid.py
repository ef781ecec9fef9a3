"""Caller ID: Bell 202 and V.23 FSK bursts (MDMF and SDMF, checksums), DTMF caller ID."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audio import callerid as cid

RATE = 8000


def burst(msg: bytes, standard: str, level: float = -15.0, noise: float = -50.0,
          seed: int = 0) -> np.ndarray:
    x = np.concatenate([np.zeros(3000), cid.fsk(msg, standard, level_dbfs=level), np.zeros(3000)])
    x += np.random.default_rng(seed).standard_normal(x.size) * 10 ** (noise / 20)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)


def stream(x: np.ndarray, sizes: tuple[int, ...] = (160, 1999, 4000)) -> list[cid.CallerId]:
    rx = cid.FskCallerIdReceiver(RATE)
    out: list[cid.CallerId] = []
    pos, i = 0, 0
    while pos < x.size:
        n = sizes[i % len(sizes)]
        out += rx.process(pos, x[pos:pos + n])
        rx = cid.FskCallerIdReceiver.from_state(RATE, rx.to_state())
        pos, i = pos + n, i + 1
    return out


@pytest.mark.parametrize("standard", ["bell202", "v23"])
@pytest.mark.parametrize("sdmf", [False, True])
@pytest.mark.parametrize("level", [-30.0, -15.0, -6.0])
def test_bursts_decode(standard: str, sdmf: bool, level: float) -> None:
    msg = cid.build_message("0123456789", None if sdmf else "ACME LTD", "11280915", sdmf=sdmf)
    (got,) = stream(burst(msg, standard, level=level, noise=level - 30))
    assert got.source == standard
    assert got.number == "0123456789" and got.datetime == "11280915"
    assert got.name == (None if sdmf else "ACME LTD")
    assert abs(got.frame - 3000) < 40


def test_withheld_number() -> None:
    (got,) = stream(burst(cid.build_message(None, "X"), "v23"))
    assert got.number is None and got.absent == "P"


def test_bad_checksum_is_refused() -> None:
    msg = bytearray(cid.build_message("5551234", "A"))
    msg[-1] ^= 0x01
    assert stream(burst(bytes(msg), "bell202")) == []


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=18),
       st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ ", max_size=15), st.booleans())
def test_message_round_trip(number: str, name: str, v23: bool) -> None:
    msg = cid.build_message(number, name or None)
    assert cid.parse_message(list(msg)) == {
        "datetime": "01011200", "number": number, **({"name": name} if name else {})}
    got = cid.decode_burst(cid.fsk(msg, "v23" if v23 else "bell202"), RATE)
    assert got is not None and got.number == number


def test_dtmf_caller_id() -> None:
    rx = cid.DtmfCallerId(RATE)
    out = [rx.feed(d, i * 800, i * 800 + 400) for i, d in enumerate("A0612345678C")]
    assert out[:-1] == [None] * 11
    assert out[-1] is not None and out[-1].number == "0612345678" and out[-1].source == "dtmf"
    rx2 = cid.DtmfCallerId(RATE)
    assert [rx2.feed(d, i * 800, i * 800 + 400) for i, d in enumerate("D10C")][-1].absent == "P"  # type: ignore[union-attr]


def test_speech_like_noise_is_not_a_burst() -> None:
    x = np.random.default_rng(3).standard_normal(RATE * 30) * 0.05
    assert stream(np.rint(x * 32768).astype(np.int16)) == []


@pytest.mark.parametrize("before", ["silence", "ring"])
@pytest.mark.parametrize("cut", [0, 1, 37, 80, 3000])
def test_burst_right_after_silence_or_ring_is_not_cut_by_the_band_gate(before: str, cut: int) -> None:
    """The receiver only demodulates around 10 ms hops with energy in the FSK band: a -30 dBFS
    burst that starts right after digital silence or a loud 25 Hz ring, with a block boundary at
    or just after its first sample, still decodes, from the same frame as a whole-signal run."""
    msg = cid.build_message("0123456789", "ACME LTD", "11280915")
    n = np.arange(RATE)
    lead = np.zeros(RATE) if before == "silence" else 0.5 * np.sin(2 * np.pi * 25 * n / RATE)
    x = np.concatenate([lead, cid.fsk(msg, "bell202", level_dbfs=-30.0), np.zeros(2000)])
    pcm = np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)
    whole = stream(pcm, (pcm.size,))
    (got,) = stream(pcm, (RATE + cut, 160, 80, 4000))
    assert whole == [got]
    assert got.number == "0123456789" and abs(got.frame - RATE) < 40


def _feed_all(digits: str, gap: int = 800) -> tuple[list[cid.CallerId], list[str]]:
    """Caller IDs found and the digits released as dialled digits, for digits 100 ms apart
    (``gap`` frames from one digit's start to the next)."""
    rx = cid.DtmfCallerId(RATE)
    found, dialled = [], []
    for i, d in enumerate(digits):
        got, released = rx.feed_digit(d, i * gap, i * gap + 480)
        dialled += [r[0] for r in released]
        if got is not None:
            found.append(got)
    dialled += [r[0] for r in rx.expire(len(digits) * gap + 2 * RATE)]
    return found, dialled


@pytest.mark.parametrize(("digits", "number", "absent"), [
    ("A5551234C", "5551234", None),      # EN 300 659-1 / ES 200 778-1 annex B
    ("A5551234#", "5551234", None),      # '#' as the stop digit
    ("D0612345678C", "0612345678", None),  # variants that start the number with D
    ("B5551234C", "5551234", None),      # variants that mark the number with B
    ("B4441234A5551234C", "5551234", None),  # redirecting number, then the number
    ("D10C", None, "P"),                 # number withheld: private
    ("D00C", None, "O"),                 # number unavailable
])
def test_dtmf_caller_id_framings(digits: str, number: str | None, absent: str | None) -> None:
    found, dialled = _feed_all(digits)
    assert dialled == []
    assert len(found) == 1 and found[0].number == number and found[0].absent == absent
    assert found[0].frame == 0 and found[0].source == "dtmf"


@pytest.mark.parametrize("digits", [
    "A5551234",   # no stop digit
    "AC",         # no number
    "A55*#9C",    # a digit no caller ID uses ('*'): all of it is dialled
])
def test_failed_dtmf_caller_id_digits_are_dialled_digits(digits: str) -> None:
    found, dialled = _feed_all(digits)
    assert found == [] and "".join(dialled) == digits


def test_dtmf_caller_id_with_a_long_gap_is_dialled_digits() -> None:
    found, dialled = _feed_all("A5551234C", gap=RATE + 800)  # more than 1 s between digits
    assert found == [] and "".join(dialled) == "A5551234C"


def test_plain_digits_pass_straight_through() -> None:
    rx = cid.DtmfCallerId(RATE)
    assert rx.feed_digit("5", 0, 480) == (None, [("5", 0, 480)])
