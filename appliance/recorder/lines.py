"""Per-line state of the recorder and the settings each line's detectors are built from."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audio.dtmf import DtmfConfig
from appliance.audio.tones import ToneConfig
from appliance.config import RecorderSection
from appliance.recorder import pci
from appliance.recorder.callmeta import OpenCall
from appliance.recorder.detect import CallDetector, DetectorConfig
from appliance.recorder.health import HealthConfig, LineHealth
from appliance.recorder.lineproc import AnalyzerConfig, LineAnalyzer
from appliance.recorder.spool import Spool
from linerec_contract.errors import FormatError

log = logging.getLogger(__name__)
PAUSE_POLL_S = 1.0


@dataclass(frozen=True)
class LineSetup:
    """Everything built from one line's settings at one rate."""

    detector: DetectorConfig
    analyzer: AnalyzerConfig
    health: HealthConfig
    max_segment_s: float
    stop_delay_s: float
    seed: int


def line_setup(section: RecorderSection, line: str, rate: int) -> LineSetup:
    r = section.for_line(line)
    det = DetectorConfig(
        rate=rate, threshold_db=r.threshold_db, min_level_dbfs=r.min_level_dbfs,
        start_debounce_ms=r.start_debounce_ms, stop_delay_s=r.stop_delay_s,
        pre_roll_s=r.pre_roll_s, min_call_s=r.min_call_s, max_segment_s=r.max_segment_s,
    )
    analyzer = AnalyzerConfig(
        rate=rate,
        dtmf=DtmfConfig(rate=rate, min_level_dbfs=r.dtmf_min_level_dbfs,
                        freq_tolerance_pct=r.dtmf_freq_tolerance_pct,
                        twist_normal_db=r.dtmf_twist_normal_db,
                        twist_reverse_db=r.dtmf_twist_reverse_db,
                        min_tone_ms=r.dtmf_min_tone_ms, min_pause_ms=r.dtmf_min_pause_ms),
        tones=ToneConfig(rate=rate, country=r.tone_country),
        callerid=r.caller_id, end_call_on_busy=r.end_call_on_busy, masking=r.pci_masking,
        mask_mode=r.pci_mask_mode, margin_ms=r.pci_margin_ms,
        pause_sequence=r.pci_pause_sequence, resume_sequence=r.pci_resume_sequence,
        pause_max_s=r.pci_pause_max_s, keep_s=max(r.pre_roll_s, 10.0) + 5.0,
    )
    health = HealthConfig(rate=rate, long_call_s=r.long_call_alarm_h * 3600.0,
                          silent_days=r.silent_alarm_days)
    return LineSetup(det, analyzer, health, r.max_segment_s, r.stop_delay_s,
                     zlib.crc32(line.encode()))


@dataclass
class LineState:
    line: str
    channel: int
    setup: LineSetup
    detector: CallDetector
    analyzer: LineAnalyzer
    health: LineHealth
    call: OpenCall | None = None
    spool: Spool | None = None
    pause_cmd: int = 0
    """Id of the last pause command from central that was applied."""
    status: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, line: str, channel: int, setup: LineSetup) -> LineState:
        return cls(line=line, channel=channel, setup=setup, detector=CallDetector(setup.detector),
                   analyzer=LineAnalyzer(setup.analyzer, setup.seed),
                   health=LineHealth(setup.health))

    def to_state(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "channel": self.channel,
            "detector": self.detector.to_state(),
            "analyzer": self.analyzer.to_state(),
            "health": self.health.to_state(),
            "pause_cmd": self.pause_cmd,
            "call": self.call.to_state() if self.call else None,
            "spool_gen": self.spool.gen if self.spool else None,
            "spool_frames": self.spool.frames if self.spool else 0,
        }

    @classmethod
    def from_state(cls, st: dict[str, Any], setup: LineSetup) -> LineState:
        line = cls.new(st["line"], st["channel"], setup)
        line.detector = CallDetector.from_state(setup.detector, st["detector"])
        if "analyzer" in st:
            try:
                line.analyzer = LineAnalyzer.from_state(setup.analyzer, setup.seed, st["analyzer"])
            except (FormatError, KeyError, TypeError, ValueError) as err:
                # E.g. the tone preset changed: the analysis restarts on this line.
                log.warning("line %s: analysis state not reusable (%s): starting afresh",
                            st["line"], err)
        line.health.restore(st.get("health"))
        line.pause_cmd = int(st.get("pause_cmd", 0))
        return line

    def poll_pause_requests(self, state_dir: Path, anchor: tuple[int, int], rate: int,
                            start: int, end: int) -> None:
        """Pause windows opened or closed by central (pci.request_pause) take effect at the
        audio captured at each request's time (at ``start`` when that audio is already past).
        The file is read once a second, and at every block while a request waits for its audio."""
        now = time.monotonic()
        if now - self.status.get("_pause_checked", 0.0) < PAUSE_POLL_S:
            return
        self.status["_pause_checked"] = now
        try:
            queue = pci.read_pause_requests(state_dir, self.line)
        except FormatError as err:
            log.warning("%s", err)
            return
        anchor_frame, anchor_wall = anchor
        for req in queue:
            if int(req["id"]) <= self.pause_cmd:
                continue
            frame = anchor_frame + (int(req["wall_ns"]) - anchor_wall) * rate // 1_000_000_000
            if frame >= end:
                self.status["_pause_checked"] = 0.0  # not yet: look again with the next block
                return
            self.pause_cmd = int(req["id"])
            if req["paused"]:
                self.analyzer.start_pause(max(frame, start), "command")
            else:
                ev = self.analyzer.end_pause(max(frame, start))
                if ev is not None and self.call is not None:
                    self.call.add(ev)
