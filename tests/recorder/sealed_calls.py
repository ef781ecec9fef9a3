"""Sealed calls read back as central would archive them (decrypted with the real age identity),
and compared call by call with a reference: the same calls, the same parts, the same samples,
unless a part carries an explicit note of the audio the box could not keep."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from linerec_contract.segment import SealedSegment
from linerec_contract.verify import open_segment_audio, open_segment_sensitive


@dataclass
class Part:
    seq: int
    part: int
    last: bool
    start: int
    frames: int
    gaps: list[dict[str, Any]]
    audio: np.ndarray
    sensitive: dict[str, Any]


def sealed_calls(segs: list[SealedSegment], identity: str) -> dict[str, list[Part]]:
    """call id -> its parts in part order, audio and sealed metadata decrypted."""
    calls: dict[str, list[Part]] = {}
    for s in segs:
        m = s.manifest
        audio, _ = open_segment_audio(s, identity)
        calls.setdefault(m["call_id"], []).append(Part(
            seq=s.seq, part=m["part"], last=m["last_part"], start=m["start_frame"],
            frames=m["frames"], gaps=list(m["gaps"]), audio=audio,
            sensitive=open_segment_sensitive(s, identity)))
    for parts in calls.values():
        parts.sort(key=lambda p: p.part)
    return calls


def loss_notes(parts: list[Part], reasons: tuple[str, ...]) -> list[dict[str, Any]]:
    return [g for p in parts for g in p.gaps if g.get("reason") in reasons]


def timeline(parts: list[Part], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, present) of a call over frames [lo, hi); parts never overlap."""
    samples = np.zeros(hi - lo, dtype=np.int16)
    present = np.zeros(hi - lo, dtype=bool)
    for p in parts:
        a, b = p.start - lo, p.start - lo + p.frames
        assert a >= 0 and b <= hi - lo, f"part {p.part} outside [{lo}, {hi})"
        assert not present[a:b].any(), f"part {p.part} overlaps an earlier part"
        samples[a:b] = p.audio
        present[a:b] = True
    return samples, present


def check_call_shape(cid: str, parts: list[Part]) -> None:
    """Part numbers run 0..n-1, only the final part is the last one, parts do not overlap."""
    assert [p.part for p in parts] == list(range(len(parts))), (cid, [p.part for p in parts])
    assert not any(p.last for p in parts[:-1]), (cid, "last_part set before the final part")
    for a, b in zip(parts, parts[1:], strict=False):
        assert b.start >= a.start + a.frames, (cid, a.part, b.part)


def compare_with_reference(ref: dict[str, list[Part]], got: dict[str, list[Part]], *,
                           loss_reasons: tuple[str, ...], same_parts: bool = True) -> int:
    """Assert ``got`` holds every call of ``ref`` with the same parts and samples; a call that
    carries a note with one of ``loss_reasons`` may differ only inside the frames those notes
    name. With ``same_parts`` false (clean stops cut parts where the uninterrupted run did not)
    each call must hold the same samples at the same frames, cut into parts anywhere, and end
    with a last part exactly when the reference does. Returns the number of calls that carried
    loss notes."""
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    assert not missing, f"calls lost by the restarts: {missing}"
    assert not extra, f"calls the uninterrupted run does not have: {extra}"
    with_losses = 0
    for cid, want in ref.items():
        have = got[cid]
        check_call_shape(cid, have)
        notes = loss_notes(have, loss_reasons)
        if not notes and same_parts:
            assert [(p.part, p.last, p.start, p.frames) for p in have] == \
                [(p.part, p.last, p.start, p.frames) for p in want], cid
            for a, b in zip(have, want, strict=True):
                assert a.gaps == b.gaps, (cid, a.part, a.gaps, b.gaps)
                assert np.array_equal(a.audio, b.audio), (cid, a.part, "samples differ")
                assert json.dumps(a.sensitive, sort_keys=True) == \
                    json.dumps(b.sensitive, sort_keys=True), (cid, a.part)
            continue
        with_losses += 1 if notes else 0
        assert have[-1].last == want[-1].last, cid
        lo = min(p.start for p in want + have)
        hi = max(p.start + p.frames for p in want + have)
        lost = np.zeros(hi - lo, dtype=bool)
        for n in notes:
            lost[max(n["at_frame"] - lo, 0):max(n["at_frame"] + n["frames"] - lo, 0)] = True
        s_want, p_want = timeline(want, lo, hi)
        s_have, p_have = timeline(have, lo, hi)
        assert not (p_have & ~p_want).any(), (cid, "frames the reference does not have")
        assert not (p_have & lost).any(), (cid, "a frame noted lost is in the audio")
        keep = p_want & ~lost
        assert p_have[keep].all(), (cid, "frames lost without a note")
        assert np.array_equal(s_have[keep], s_want[keep]), (cid, "samples changed")
    return with_losses
