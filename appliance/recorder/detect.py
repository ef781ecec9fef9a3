"""Per-line voice-activity call detection.

The detector works on frames (20 ms by default). Each frame's RMS level is computed with numpy
for a whole block at once; a small per-frame state machine then decides:

* **voice**: the frame level exceeds the line's noise floor by ``threshold_db`` and exceeds
  ``min_level_dbfs``;
* **onset**: ``start_debounce_ms`` of consecutive voice frames. The onset becomes a call as soon
  as the frame levels since its first voice frame span at least ``min_modulation_db`` (speech
  has syllables and pauses, DTMF has gaps). A level that stays flat for ``confirm_s`` is a step
  change in the line noise, not a call: the floor jumps to it and no event is emitted;
* **call_start**: the event's frame is the onset's first voice frame minus ``pre_roll_s``,
  clamped at 0 and at the previous call's end;
* **call_end**: once ``stop_delay_s`` has passed without voice. The event's frame is the end of
  the last voice frame plus ``hangover_s`` (so the trailing silence kept is short and does not
  depend on where blocks were cut). ``call_discard`` replaces it when the voiced span (first to
  last voice frame) is shorter than ``min_call_s``.

* **noise step in a call**: voice frames whose level stays within ``min_modulation_db`` for
  ``flat_in_call_s`` are re-read as line noise: the floor jumps to them and the call's last
  voice frame is the one before them, so the stop delay can run out.

The noise floor follows the frame levels only while the line is idle: it falls fast
(``floor += 0.3 * (level - floor)``) and rises slowly (``floor_rise_db_s``).

Frames are cut from the first sample the detector sees, whatever the block sizes; a partial
frame is carried to the next block. Every decision depends only on the samples and their frame
indices, so any chunking of a stream gives the same events, and :meth:`CallDetector.to_state` /
:meth:`CallDetector.from_state` resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from appliance.audio.dsp import FLOOR_DBFS, frame_levels_db
from linerec_contract.errors import ConfigError, FormatError

CALL_START = "call_start"
CALL_END = "call_end"
CALL_DISCARD = "call_discard"

STATE_VERSION = 1

_IDLE = "idle"
_ONSET = "onset"
_CALL = "call"
_FALL = 0.3


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of the call detector; every field has a safe default."""

    rate: int = 8000
    frame_ms: int = 20
    threshold_db: float = 12.0
    """Voice when the frame level exceeds the noise floor by this much..."""
    min_level_dbfs: float = -50.0
    """...and exceeds this absolute level."""
    start_debounce_ms: int = 60
    """Voice must persist this long to start a call."""
    stop_delay_s: float = 4.0
    """Silence this long ends a call."""
    pre_roll_s: float = 2.0
    min_call_s: float = 1.0
    """Calls whose voiced span is shorter are discarded."""
    max_segment_s: float = 300.0
    """Not used by the detector: the recorder cuts long calls into parts of this length."""
    hangover_s: float = 0.5
    """Silence kept after the last voice frame of a call."""
    confirm_s: float = 1.0
    """An onset whose level stays flat this long is a noise step, not a call."""
    min_modulation_db: float = 6.0
    """Level range (max - min over frames) that confirms an onset as a call."""
    flat_in_call_s: float = 2.0
    """In a call, voice frames whose level stays flat this long are a noise step: the floor
    jumps to them and they count as silence (so a step in the line noise cannot hold a call
    open forever)."""
    floor_rise_db_s: float = 1.0
    """How fast the noise floor may rise while the line is idle."""

    def __post_init__(self) -> None:
        _check(self.rate >= 1000, "rate", self.rate, "an integer >= 1000")
        _check(1 <= self.frame_ms <= 100, "frame_ms", self.frame_ms, "1..100")
        _check(
            self.rate * self.frame_ms % 1000 == 0,
            "frame_ms",
            self.frame_ms,
            f"a duration that is a whole number of samples at rate {self.rate}",
        )
        _check(0 < self.threshold_db <= 60, "threshold_db", self.threshold_db, "0..60 dB")
        _check(-120 <= self.min_level_dbfs <= 0, "min_level_dbfs", self.min_level_dbfs, "-120..0")
        _check(0 <= self.start_debounce_ms <= 2000, "start_debounce_ms", self.start_debounce_ms,
               "0..2000 ms")
        _check(0.1 <= self.stop_delay_s <= 600, "stop_delay_s", self.stop_delay_s, "0.1..600 s")
        _check(0 <= self.pre_roll_s <= 60, "pre_roll_s", self.pre_roll_s, "0..60 s")
        _check(0 <= self.min_call_s <= 600, "min_call_s", self.min_call_s, "0..600 s")
        _check(1 <= self.max_segment_s <= 86400, "max_segment_s", self.max_segment_s,
               "1..86400 s")
        _check(0 <= self.hangover_s <= self.stop_delay_s, "hangover_s", self.hangover_s,
               f"0..stop_delay_s ({self.stop_delay_s})")
        _check(0 < self.confirm_s <= self.stop_delay_s, "confirm_s", self.confirm_s,
               f"above 0, up to stop_delay_s ({self.stop_delay_s})")
        _check(0 < self.min_modulation_db <= 60, "min_modulation_db", self.min_modulation_db,
               "0..60 dB")
        _check(0 < self.flat_in_call_s <= 600, "flat_in_call_s", self.flat_in_call_s,
               "0..600 s")
        _check(0 < self.floor_rise_db_s <= 100, "floor_rise_db_s", self.floor_rise_db_s,
               "0..100 dB/s")

    @property
    def frame_len(self) -> int:
        """Samples per frame."""
        return self.rate * self.frame_ms // 1000


def _check(ok: bool, key: str, value: object, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"detector setting {key}={value!r} is out of range; accepted: {accepted}")


@dataclass(frozen=True)
class DetectorEvent:
    """A call boundary on one line; ``frame`` is a line frame (sample) index.

    For ``call_start`` the first frame of the call including pre-roll; for ``call_end`` and
    ``call_discard`` the frame after the last frame kept, and ``call_frames`` the call's length.
    """

    kind: str
    frame: int
    call_frames: int = 0


class CallDetector:
    """The call detector of one line (see the module docstring)."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self._cfg = cfg
        flen = cfg.frame_len
        self._flen = flen
        self._debounce = max(1, math.ceil(cfg.start_debounce_ms / cfg.frame_ms))
        self._confirm = max(1, math.ceil(cfg.confirm_s * 1000 / cfg.frame_ms))
        self._stop = round(cfg.stop_delay_s * cfg.rate)
        self._hangover = round(cfg.hangover_s * cfg.rate)
        self._pre_roll = round(cfg.pre_roll_s * cfg.rate)
        self._min_call = round(cfg.min_call_s * cfg.rate)
        self._flat_max = max(1, math.ceil(cfg.flat_in_call_s * 1000 / cfg.frame_ms))
        self._rise = cfg.floor_rise_db_s * cfg.frame_ms / 1000.0
        # State (everything below is saved by to_state).
        self._next: int | None = None  # frame index of the next sample expected
        self._partial = np.zeros(0, dtype=np.int16)  # samples of an incomplete frame
        self._floor: float | None = None
        self._level = FLOOR_DBFS
        self._mode = _IDLE
        self._run = 0  # consecutive voice frames while idle
        self._run_start = 0  # first sample of the voice run / onset / call's voice
        self._lo = 0.0  # level range since _run_start
        self._hi = 0.0
        self._onset_frames = 0
        self._voice_end = 0  # sample after the last voice frame
        self._call_start = 0  # first sample of the call including pre-roll
        self._prev_end = 0  # end of the previous call
        self._flat = 0  # in a call: frames in the current run of flat voice frames
        self._flat_lo = 0.0
        self._flat_hi = 0.0
        self._flat_voice_end = 0  # _voice_end before that run began

    @property
    def in_call(self) -> bool:
        """True from call_start until call_end or call_discard."""
        return self._mode == _CALL

    @property
    def noise_floor_db(self) -> float:
        """The line's noise floor estimate in dBFS."""
        return FLOOR_DBFS if self._floor is None else self._floor

    @property
    def level_db(self) -> float:
        """The level of the last complete frame in dBFS."""
        return self._level

    def process(self, start_frame: int, block: np.ndarray) -> list[DetectorEvent]:
        """Feed ``block`` (1-D int16) whose first sample is line frame ``start_frame``.

        Blocks must be contiguous. A later ``start_frame`` (a gap in the source) drops the
        incomplete frame and realigns frames to ``start_frame``; the missing time counts as
        silence. An earlier one raises ValueError.
        """
        if block.ndim != 1 or block.dtype != np.int16:
            raise ValueError(
                f"block of dtype {block.dtype} and shape {block.shape} is not accepted; "
                "accepted: 1-D int16"
            )
        if self._next is not None and start_frame < self._next:
            raise ValueError(
                f"block starts at frame {start_frame}, before the next expected {self._next}"
            )
        if self._next is None or start_frame > self._next:
            self._partial = np.zeros(0, dtype=np.int16)
            base = start_frame
            samples = block
        else:
            base = start_frame - self._partial.shape[0]
            samples = np.concatenate((self._partial, block)) if self._partial.size else block
        self._next = start_frame + block.shape[0]
        n = samples.shape[0] // self._flen
        self._partial = samples[n * self._flen :].copy()
        if n == 0:
            return []
        levels = frame_levels_db(samples[: n * self._flen], self._flen)
        return self._run_frames(base, levels.tolist())

    def _run_frames(self, base: int, levels: list[float]) -> list[DetectorEvent]:
        cfg = self._cfg
        flen = self._flen
        thr = cfg.threshold_db
        min_level = cfg.min_level_dbfs
        events: list[DetectorEvent] = []
        floor = levels[0] if self._floor is None else self._floor
        mode = self._mode
        pos = base
        for level in levels:
            voice = level > floor + thr and level > min_level
            if mode == _IDLE:
                if voice:
                    if self._run == 0:
                        self._run_start = pos
                        self._lo = self._hi = level
                    self._run += 1
                    self._lo = min(self._lo, level)
                    self._hi = max(self._hi, level)
                    self._voice_end = pos + flen
                    if self._run >= self._debounce:
                        mode = _ONSET
                        self._onset_frames = self._run
                        self._run = 0
                else:
                    self._run = 0
                    if level < floor:
                        floor += _FALL * (level - floor)
                    else:
                        floor += min(level - floor, self._rise)
            elif mode == _CALL:
                if not voice:
                    self._flat = 0
                elif self._flat and (
                    max(self._flat_hi, level) - min(self._flat_lo, level) < cfg.min_modulation_db
                ):
                    self._flat += 1
                    self._flat_lo = min(self._flat_lo, level)
                    self._flat_hi = max(self._flat_hi, level)
                    self._voice_end = pos + flen
                    if self._flat >= self._flat_max:
                        # The line noise stepped up during the call: those were not voice.
                        floor = self._flat_lo
                        self._voice_end = self._flat_voice_end
                        self._flat = 0
                else:
                    self._flat = 1
                    self._flat_lo = self._flat_hi = level
                    self._flat_voice_end = self._voice_end
                    self._voice_end = pos + flen
            else:
                if voice:
                    self._voice_end = pos + flen
                if mode == _ONSET:
                    self._onset_frames += 1
                    self._lo = min(self._lo, level)
                    self._hi = max(self._hi, level)
            if mode == _ONSET:
                if self._hi - self._lo >= cfg.min_modulation_db:
                    mode = _CALL
                    self._flat = 0
                    self._call_start = max(self._run_start - self._pre_roll, self._prev_end, 0)
                    events.append(DetectorEvent(CALL_START, self._call_start))
                elif self._onset_frames >= self._confirm:
                    # A flat level: the line noise stepped up. Take it as the new floor.
                    mode = _IDLE
                    floor = self._lo
            if mode == _CALL and pos + flen - self._voice_end >= self._stop:
                end = min(self._voice_end + self._hangover, pos + flen)
                voiced = self._voice_end - self._run_start
                kind = CALL_DISCARD if voiced < self._min_call else CALL_END
                events.append(DetectorEvent(kind, end, end - self._call_start))
                self._prev_end = end
                mode = _IDLE
            pos += flen
        self._floor = floor
        self._mode = mode
        self._level = levels[-1]
        return events

    @property
    def idle(self) -> bool:
        """True when neither a call nor an onset is open."""
        return self._mode == _IDLE

    def suspend(self) -> None:
        """Forget the open call or onset but keep the noise floor: the box was stopped, and
        the audio after the restart must start a call afresh (the recorder then decides whether
        it is the same call going on)."""
        self._prev_end = self._next or 0
        self._mode, self._run, self._flat, self._onset_frames = _IDLE, 0, 0, 0

    @property
    def voice_start(self) -> int:
        """First voice frame of the open call (or onset)."""
        return self._run_start

    def force_end(self, frame: int, tone_start: int) -> DetectorEvent | None:
        """End the open call because a busy or reorder tone began at ``tone_start`` (recognised
        at ``frame``). A call whose voice began with the tone was the tone: it is discarded.
        Call this between blocks, at ``frame``; an onset in progress is dropped."""
        if self._mode == _ONSET:
            self._mode, self._run = _IDLE, 0
            return None
        if self._mode != _CALL:
            return None
        if self._run_start >= tone_start - self._flen:
            end = max(min(frame, self._voice_end), self._call_start)
            kind = CALL_DISCARD
        else:
            end = max(min(tone_start, frame), self._call_start)
            kind = CALL_END
        self._prev_end = end
        self._mode, self._run, self._flat = _IDLE, 0, 0
        return DetectorEvent(kind, end, end - self._call_start)

    def to_state(self) -> dict[str, Any]:
        """The detector's full state as JSON-serialisable data."""
        return {
            "version": STATE_VERSION,
            "next": self._next,
            "partial": [int(v) for v in self._partial],
            "floor": self._floor,
            "level": self._level,
            "mode": self._mode,
            "run": self._run,
            "run_start": self._run_start,
            "lo": self._lo,
            "hi": self._hi,
            "onset_frames": self._onset_frames,
            "voice_end": self._voice_end,
            "call_start": self._call_start,
            "prev_end": self._prev_end,
            "flat": self._flat,
            "flat_lo": self._flat_lo,
            "flat_hi": self._flat_hi,
            "flat_voice_end": self._flat_voice_end,
            "config": {f.name: getattr(self._cfg, f.name) for f in fields(self._cfg)},
        }

    @classmethod
    def from_state(cls, cfg: DetectorConfig, state: dict[str, Any]) -> CallDetector:
        """A detector that resumes exactly where the one that saved ``state`` stopped.

        The state keeps the frame alignment and thresholds of the config it was made with; a
        different ``cfg`` is accepted (a config change applies from here on).
        """
        det = cls(cfg)
        try:
            if state["version"] != STATE_VERSION:
                raise FormatError(
                    f"detector state version {state['version']!r} is not supported; "
                    f"accepted: {STATE_VERSION}"
                )
            det._next = None if state["next"] is None else int(state["next"])
            det._partial = np.asarray(state["partial"], dtype=np.int16)
            det._floor = None if state["floor"] is None else float(state["floor"])
            det._level = float(state["level"])
            mode = str(state["mode"])
            if mode not in (_IDLE, _ONSET, _CALL):
                raise FormatError(
                    f"detector state mode {mode!r} is not valid; accepted: idle, onset, call"
                )
            det._mode = mode
            det._run = int(state["run"])
            det._run_start = int(state["run_start"])
            det._lo = float(state["lo"])
            det._hi = float(state["hi"])
            det._onset_frames = int(state["onset_frames"])
            det._voice_end = int(state["voice_end"])
            det._call_start = int(state["call_start"])
            det._prev_end = int(state["prev_end"])
            det._flat = int(state["flat"])
            det._flat_lo = float(state["flat_lo"])
            det._flat_hi = float(state["flat_hi"])
            det._flat_voice_end = int(state["flat_voice_end"])
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"detector state is malformed: {err!r}") from err
        if det._partial.shape[0] >= det._flen:
            raise FormatError(
                f"detector state holds {det._partial.shape[0]} partial samples; "
                f"accepted: fewer than the frame length {det._flen}"
            )
        return det
