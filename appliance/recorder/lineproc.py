"""Per-line signal analysis beside the call detector: DTMF, call-progress tones, caller ID, PCI
masking spans and pause windows. One :class:`LineAnalyzer` per line, used by the recorder
service and by ``appliance analyze``.

Every block of a line goes through :meth:`LineAnalyzer.process` before the call detector sees it.
The result holds the block's *events* (plain dicts with line frames), the *controls* for the call
detector (end the call where a busy or reorder tone began) at the frame where the tone was
recognised, and *backfill*: mask spans that reach back before the block (a digit is recognised
40 ms after it began), which the recorder applies to audio it already spooled. The analyzer's
whole state is serialisable; all detectors in it are chunking-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.audio import tones
from appliance.audio.callerid import DtmfCallerId, FskCallerIdReceiver
from appliance.audio.dtmf import WINDOW_HOPS, DtmfConfig, DtmfDetector, DtmfEvent
from appliance.recorder import pci
from appliance.recorder.pci import MaskSpan, SequenceMatcher

STATE_VERSION = 1
OPEN_END = 1 << 62
ENDING_TONES = (tones.BUSY, tones.REORDER)


@dataclass(frozen=True)
class AnalyzerConfig:
    rate: int = 8000
    dtmf: DtmfConfig = field(default_factory=DtmfConfig)
    tones: tones.ToneConfig = field(default_factory=tones.ToneConfig)
    callerid: bool = True
    end_call_on_busy: bool = True
    masking: bool = False
    mask_mode: str = pci.SILENCE
    margin_ms: int = 20
    pause_sequence: str = ""
    resume_sequence: str = ""
    pause_max_s: float = 600.0
    keep_s: float = 15.0
    """How long recent events and spans are kept for a call that starts later (pre-roll,
    ringing and caller ID before the call)."""


@dataclass
class Analysis:
    events: list[dict[str, Any]] = field(default_factory=list)
    controls: list[tuple[int, str, int]] = field(default_factory=list)
    """(frame, "end_call", tone start) or (frame, "tone_over", tone start)."""
    backfill: list[MaskSpan] = field(default_factory=list)
    taken: set[tuple[str, int]] = field(default_factory=set)
    """(call id, index in ``events``) of the events a call already took."""


class LineAnalyzer:
    def __init__(self, cfg: AnalyzerConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.dtmf = DtmfDetector(cfg.dtmf)
        self.tones = tones.ToneDetector(cfg.tones)
        self.fsk = FskCallerIdReceiver(cfg.rate)
        self.dtmf_cid = DtmfCallerId(cfg.rate)
        self._margin = cfg.margin_ms * cfg.rate // 1000
        self.spans: list[MaskSpan] = []  # final spans, recent ones only
        self.recent: list[dict[str, Any]] = []  # recent events (for a call that starts later)
        self._known: dict[int, int] = {}  # span start -> frame up to which it was applied
        self._pause = SequenceMatcher(cfg.pause_sequence)
        self._resume = SequenceMatcher(cfg.resume_sequence)
        self._resume_first = 0
        self.paused_since: int | None = None
        self.paused_by = ""
        self._pause_level = -120.0
        self.pos = 0  # the frame after the last one analysed

    # -- spans -------------------------------------------------------------------------------

    def provisional(self) -> list[MaskSpan]:
        """Spans still growing: the digit sounding now (masking on) and an open pause."""
        out = []
        active = self.dtmf.active
        if self.cfg.masking and active is not None:
            out.append(MaskSpan(active[1] - self._margin, OPEN_END, self.dtmf.quiet_dbfs, "pci-masked"))
        if self.paused_since is not None:
            end = self._resume_end()
            out.append(MaskSpan(self.paused_since, max(end, self.paused_since), self._pause_level,
                                "pci-pause"))
        return out

    def _confirmed_at(self, digit_start: int) -> int:
        """The first frame by which the receiver can have confirmed a digit that began at
        ``digit_start``: audio before it was spooled before the digit was known."""
        return digit_start + (self.cfg.dtmf.on_pairs + WINDOW_HOPS) * self.cfg.dtmf.hop

    def _resume_end(self) -> int:
        """Where an open pause window ends if the resume sequence under way completes: the
        frame by which its first digit was confirmed (OPEN_END while none is under way)."""
        seq = self._resume.sequence
        if not seq:
            return OPEN_END
        if self._resume.matched > 0:
            return self._confirmed_at(self._resume_first)
        active = self.dtmf.active
        if active is not None and active[0] == seq[0]:
            return self._confirmed_at(active[1])
        return OPEN_END

    def current_spans(self) -> list[MaskSpan]:
        return self.spans + self.provisional()

    def mask(self, block: np.ndarray, start: int) -> np.ndarray:
        return pci.apply(block, start, self.current_spans(), self.cfg.mask_mode, self.seed)

    def fill(self, a: int, b: int, level_dbfs: float) -> np.ndarray:
        return pci.fill(a, b, self.cfg.mask_mode, level_dbfs, self.seed)

    # -- processing --------------------------------------------------------------------------

    def process(self, start: int, block: np.ndarray) -> Analysis:
        """Analyse the line's frames [start, start + len(block)).

        Nothing here depends on how the audio was cut into blocks: events carry their own
        frames, and spans and recent events are kept until every block they touch is done."""
        out = Analysis()
        end = start + block.shape[0]
        for ev in self.dtmf.process(start, block):
            self._digit(ev, out)
        if self.cfg.callerid:
            self._dialled(self.dtmf_cid.expire(end), out)
        for tev in self.tones.process(start, block):
            if tev.state == "start":
                out.events.append({"kind": "tone", "tone": tev.kind, "frame": tev.start,
                                   "at": tev.frame})
                if tev.kind in ENDING_TONES and self.cfg.end_call_on_busy:
                    out.controls.append((tev.frame, "end_call", tev.start))
            else:
                out.events.append({"kind": "tone-end", "tone": tev.kind, "frame": tev.frame,
                                   "since": tev.start})
                if tev.kind in ENDING_TONES and self.cfg.end_call_on_busy:
                    out.controls.append((max(tev.frame, start), "tone_over", tev.start))
        if self.cfg.callerid:
            for cid in self.fsk.process(start, block):
                out.events.append({"kind": "callerid", "frame": cid.frame, **cid.to_dict()})
        if self.paused_since is not None and end - self.paused_since > self.cfg.pause_max_s * self.cfg.rate:
            self.end_pause(self.paused_since + round(self.cfg.pause_max_s * self.cfg.rate), out)
        out.controls.sort()
        # Spans that reach back before this block and were not applied yet.
        # (A pause window that stopped short for a resume sequence that then failed grows again.)
        current = self.current_spans()
        for sp in current:
            a = max(self._known.get(sp.start, sp.start), sp.start)
            if a < min(sp.end, start):
                out.backfill.append(MaskSpan(a, min(sp.end, start), sp.level_dbfs, sp.reason))
        # The caller masks this block with ``current``.
        self._known = {sp.start: max(min(sp.end, end), self._known.get(sp.start, 0))
                       for sp in current}
        self.recent.extend(out.events)
        # The caller still masks, spools and cuts this whole block (and takes pre-roll and early
        # events from before it): only what ended keep_s before its first frame can go.
        self._prune(start)
        self.pos = end
        return out

    def finish(self, end: int) -> list[dict[str, Any]]:
        """Events still held at the end of the input (a digit sounding, a caller ID cut short)."""
        out = Analysis()
        for ev in self.dtmf.flush():
            self._digit(ev, out)
        self._dialled(self.dtmf_cid.expire(end + round(DtmfCallerId.MAX_GAP_S * self.cfg.rate) + 1), out)
        return out.events

    def _digit(self, ev: DtmfEvent, out: Analysis) -> None:
        cfg = self.cfg
        if cfg.masking:
            # To the end of the tone plus the margin, or as long as the receiver still counted
            # the digit as sounding, whichever is later (the same however the audio was cut).
            end = max(ev.end + self._margin, ev.decided)
            span = MaskSpan(ev.start - self._margin, end, ev.quiet_dbfs, "pci-masked")
            self.spans.append(span)
            out.events.append({"kind": "dtmf-masked", "frame": span.start, "end": span.end})
        if cfg.callerid:
            # Digits of a caller-ID message are held until it completes (caller ID) or fails.
            cid, dialled = self.dtmf_cid.feed_digit(ev.digit, ev.start, ev.end)
            self._dialled(dialled, out)
            if cid is not None:
                out.events.append({"kind": "callerid", "frame": cid.frame, **cid.to_dict()})
        else:
            self._dialled([(ev.digit, ev.start, ev.end)], out)
        if self._resume.matched == 0:
            self._resume_first = ev.start
        if self.paused_since is None and self._pause.feed(ev.digit):
            self.start_pause(ev.end + self._margin, "digits", ev.quiet_dbfs)
        elif self.paused_since is not None and self._resume.feed(ev.digit):
            self.end_pause(max(self._confirmed_at(self._resume_first), self.paused_since), out)

    def _dialled(self, digits: list[tuple[str, int, int]], out: Analysis) -> None:
        if not self.cfg.masking:
            out.events.extend({"kind": "dtmf", "digit": d, "frame": a, "end": b} for d, a, b in digits)

    def start_pause(self, frame: int, by: str, level_dbfs: float | None = None) -> None:
        if self.paused_since is None:
            self.paused_since = frame
            self.paused_by = by
            self._pause_level = self.dtmf.quiet_dbfs if level_dbfs is None else level_dbfs

    def end_pause(self, frame: int, out: Analysis | None = None) -> dict[str, Any] | None:
        """Close an open pause window at ``frame`` (a resume sequence, a command, the call's end,
        or the longest pause); returns its event."""
        if self.paused_since is None:
            return None
        span = MaskSpan(self.paused_since, max(frame, self.paused_since), self._pause_level, "pci-pause")
        self.spans.append(span)
        ev = {"kind": "pause", "frame": span.start, "end": span.end, "by": self.paused_by}
        self.paused_since = None
        self._resume.matched = 0
        if out is not None:
            out.events.append(ev)
        self.recent.append(ev)
        return ev

    def _prune(self, now: int) -> None:
        keep = now - round(self.cfg.keep_s * self.cfg.rate)
        self.spans = [sp for sp in self.spans if sp.end > keep]
        self.recent = [ev for ev in self.recent if max(ev["frame"], ev.get("end") or 0) > keep]

    # -- state -------------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "dtmf": self.dtmf.to_state(),
            "tones": self.tones.to_state(),
            "fsk": self.fsk.to_state(),
            "dtmf_cid": self.dtmf_cid.to_state(),
            "spans": [sp.to_state() for sp in self.spans],
            "recent": self.recent,
            "known": [[a, b] for a, b in self._known.items()],
            "pause": [self._pause.matched, self._resume.matched, self._resume_first,
                      self.paused_since, self.paused_by, self._pause_level],
            "pos": self.pos,
        }

    @classmethod
    def from_state(cls, cfg: AnalyzerConfig, seed: int, st: dict[str, Any]) -> LineAnalyzer:
        an = cls(cfg, seed)
        an.dtmf = DtmfDetector.from_state(cfg.dtmf, st["dtmf"])
        an.tones = tones.ToneDetector.from_state(cfg.tones, st["tones"])
        an.fsk = FskCallerIdReceiver.from_state(cfg.rate, st["fsk"])
        an.dtmf_cid.restore(st["dtmf_cid"])
        an.spans = [MaskSpan.from_state(s) for s in st["spans"]]
        an.recent = list(st["recent"])
        # [start, applied up to]; an older checkpoint lists starts applied up to ``pos``.
        an._known = {int(k[0]) if isinstance(k, list) else int(k):
                     int(k[1]) if isinstance(k, list) else int(st["pos"]) for k in st["known"]}
        p = st["pause"]
        an._pause.matched, an._resume.matched, an._resume_first = int(p[0]), int(p[1]), int(p[2])
        an.paused_since = None if p[3] is None else int(p[3])
        an.paused_by, an._pause_level = str(p[4]), float(p[5])
        an.pos = int(st["pos"])
        return an
