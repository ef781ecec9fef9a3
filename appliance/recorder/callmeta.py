"""What a sealed part says about its call besides the audio.

Sensitive facts (digits, the dialled number, caller ID, tones heard) go into the segment's
encrypted ``sensitive`` metadata; what the audio lost on purpose (PCI-masked digits, pause
windows) goes into the clear ``gaps`` list, with positions but never digits. With PCI masking on
no digit is kept anywhere: the events say only that a digit was masked, and where.

Times inside ``sensitive`` are ``[seconds, milliseconds]`` from the part's first frame: the
sealer refuses a segment where a sensitive number of 6 or more digits appears in a clear field,
and such short numbers cannot collide with the frame positions in ``gaps``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from linerec_contract.manifest import sensitive_leaves

INBOUND_WINDOW_S = 10.0
MAX_NOTES = 500


@dataclass
class OpenCall:
    call_id: str
    call_start_frame: int
    part: int
    part_start_frame: int
    gaps: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    """Events of the call not yet sealed (line frames)."""
    inbound: bool = False
    caller_id: dict[str, Any] | None = None
    dialled: str = ""
    masked_digits: int = 0
    resumed: dict[str, Any] | None = None
    """After a clean stop: the gap note of the downtime, until the audio after the restart
    shows whether the call goes on (see ``Recorder._resume_after_stop``)."""

    def to_state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def copy(self) -> OpenCall:
        return OpenCall(**json.loads(json.dumps(self.to_state())))

    def add(self, ev: dict[str, Any]) -> None:
        kind = ev["kind"]
        if kind == "dtmf":
            self.dialled += ev["digit"]
        elif kind == "dtmf-masked":
            self.masked_digits += 1
        elif kind == "callerid":
            self.caller_id = {k: v for k, v in ev.items() if k not in ("kind", "frame")}
            self.inbound = True
        elif kind == "tone" and ev["tone"] == "ring":
            self.inbound = True
        self.events.append(ev)

    def drop_from(self, end: int) -> None:
        """The call ended at ``end``: events from there on (taken with the block the end fell
        in) belong to no part of it."""
        late = [e for e in self.events if e["frame"] >= end]
        if not late:
            return
        self.events = [e for e in self.events if e["frame"] < end]
        dialled = sum(1 for e in late if e["kind"] == "dtmf")
        if dialled:
            self.dialled = self.dialled[:-dialled]
        self.masked_digits -= sum(1 for e in late if e["kind"] == "dtmf-masked")
        if any(e["kind"] in ("callerid", "tone") for e in late):
            cids = [e for e in self.events if e["kind"] == "callerid"]
            if any(e["kind"] == "callerid" for e in late):
                self.caller_id = ({k: v for k, v in cids[-1].items() if k not in ("kind", "frame")}
                                  if cids else None)
            self.inbound = self.part > 0 and self.inbound or bool(cids) or any(
                e["kind"] == "tone" and e["tone"] == "ring" for e in self.events)

    def split(self, at: int) -> list[dict[str, Any]]:
        """Events before frame ``at`` (they go with the part that ends there); the rest stay."""
        before = [e for e in self.events if e["frame"] < at]
        self.events = [e for e in self.events if e["frame"] >= at]
        for e in before:  # a pause or mask crossing the cut continues in the next part
            if e.get("end") is not None and e["end"] > at and e["kind"] in ("pause", "dtmf-masked"):
                self.events.append({**e, "frame": at})
        return before


def _rel(frame: int, start: int, rate: int) -> list[int]:
    ms = max(frame - start, 0) * 1000 // rate
    return [ms // 1000, ms % 1000]


def part_meta(call: OpenCall, events: list[dict[str, Any]], start: int, frames: int, rate: int,
              *, last: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sensitive, clear notes) of the part [start, start + frames)."""
    end = start + frames
    sensitive: dict[str, Any] = {}
    notes: list[dict[str, Any]] = []
    out_events: list[dict[str, Any]] = []
    for ev in events:
        kind = ev["kind"]
        if kind in ("dtmf-masked", "pause"):
            a, b = max(ev["frame"], start), min(ev.get("end") or end, end)
            if a < b:
                note: dict[str, Any] = {"reason": "pci-masked" if kind == "dtmf-masked" else "pci-pause",
                                        "at_frame": a, "frames": b - a}
                if kind == "pause":
                    note["by"] = ev.get("by", "digits")
                notes.append(note)
            continue
        item: dict[str, Any] = {"kind": kind, "t": _rel(ev["frame"], start, rate)}
        if kind == "dtmf":
            item["digit"] = ev["digit"]
            item["ms"] = (ev["end"] - ev["frame"]) * 1000 // rate
        elif kind in ("tone", "tone-end"):
            item["tone"] = ev["tone"]
        elif kind == "callerid":
            item.update({k: v for k, v in ev.items() if k not in ("kind", "frame")})
        out_events.append(item)
    if out_events:
        sensitive["events"] = out_events
    if call.dialled:
        sensitive["dialled"] = call.dialled
    if call.caller_id:
        sensitive["caller_id"] = call.caller_id
    if call.inbound:
        sensitive["direction"] = "inbound"
    if call.masked_digits:
        sensitive["masked_digits"] = call.masked_digits
    if len(notes) > MAX_NOTES:
        notes = notes[:MAX_NOTES] + [{"reason": "pci-masked-more", "count": len(notes) - MAX_NOTES}]
    _ = last
    return sensitive, notes


def avoid_leaks(sensitive: dict[str, Any], gaps: list[dict[str, Any]],
                notes: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Make sure no sensitive number appears in the clear list (the sealer would refuse the
    segment): first the PCI notes lose their positions, then the colliding facts are dropped."""

    def collides(sens: dict[str, Any], clear: list[dict[str, Any]]) -> bool:
        text = json.dumps(clear, separators=(",", ":"), sort_keys=True)
        return any(leaf in text for leaf in sensitive_leaves(sens))

    if not collides(sensitive, gaps + notes):
        return sensitive, gaps + notes
    counts: dict[str, int] = {}
    for n in notes:
        counts[n["reason"]] = counts.get(n["reason"], 0) + 1
    coarse = [{"reason": r, "count": c, "positions": "withheld"} for r, c in sorted(counts.items())]
    if not collides(sensitive, gaps + coarse):
        return sensitive, gaps + coarse
    kept = {k: v for k, v in sensitive.items() if not collides({k: v}, gaps + coarse)}
    kept["withheld"] = "a value collided with a clear field"
    return kept, gaps + coarse
