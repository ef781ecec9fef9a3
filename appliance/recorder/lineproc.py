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
from appliance.audio.dtmf import DtmfConfig, DtmfDetector, DtmfEvent
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
        self._known: list[int] = []  # starts of spans already applied
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
            out.append(MaskSpan(self.paused_since, OPEN_END, self._pause_level, "pci-pause"))
        return out

    def current_spans(self) -> list[MaskSpan]:
        return self.spans + self.provisional()

    def mask(self, block: np.ndarray, start: int) -> np.ndarray:
        return pci.apply(block, start, self.current_spans(), self.cfg.mask_mode, self.seed)

    def fill(self, a: int, b: int, level_dbfs: float) -> np.ndarray:
        return pci.fill(a, b, self.cfg.mask_mode, level_dbfs, self.seed)

    # -- processing --------------------------------------------------------------------------

    def process(self, start: int, block: np.ndarray, *, in_call: bool) -> Analysis:
        out = Analysis()
        end = start + block.shape[0]
        for ev in self.dtmf.process(start, block):
            self._digit(ev, out, in_call)
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
        for sp in self.current_spans():
            if sp.start < start and sp.start not in self._known:
                out.backfill.append(MaskSpan(sp.start, min(sp.end, start), sp.level_dbfs, sp.reason))
        self._known = [sp.start for sp in self.current_spans()]
        self.recent.extend(out.events)
        self._prune(end)
        self.pos = end
        return out

    def _digit(self, ev: DtmfEvent, out: Analysis, in_call: bool) -> None:
        cfg = self.cfg
        if cfg.masking:
            span = MaskSpan(ev.start - self._margin, ev.end + self._margin, ev.quiet_dbfs, "pci-masked")
            self.spans.append(span)
            out.events.append({"kind": "dtmf-masked", "frame": span.start, "end": span.end})
        else:
            out.events.append({"kind": "dtmf", "digit": ev.digit, "frame": ev.start, "end": ev.end})
        if not in_call and cfg.callerid:
            cid = self.dtmf_cid.feed(ev.digit, ev.start, ev.end)
            if cid is not None:
                out.events.append({"kind": "callerid", "frame": cid.frame, **cid.to_dict()})
        if self._resume.matched == 0:
            self._resume_first = ev.start
        if self.paused_since is None and self._pause.feed(ev.digit):
            self.start_pause(ev.end + self._margin, "digits", ev.quiet_dbfs)
        elif self.paused_since is not None and self._resume.feed(ev.digit):
            self.end_pause(max(self._resume_first - self._margin, self.paused_since), out)

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
            "known": self._known,
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
        an._known = [int(v) for v in st["known"]]
        p = st["pause"]
        an._pause.matched, an._resume.matched, an._resume_first = int(p[0]), int(p[1]), int(p[2])
        an.paused_since = None if p[3] is None else int(p[3])
        an.paused_by, an._pause_level = str(p[4]), float(p[5])
        an.pos = int(st["pos"])
        return an
