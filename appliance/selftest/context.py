"""What the checks of one run share: the config, and the audio taken once per capture stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from appliance.audio.source import AudioError, CaptureSource, SourceExhausted, open_source
from appliance.config import CaptureSection, Config
from appliance.errors import ApplianceError
from appliance.selftest.signal import LineMeasures, measure


@dataclass(frozen=True)
class Take:
    """Audio captured from one stream through the capture path, or why there is none."""

    stream: str
    description: str
    rate: int
    pcm: npt.NDArray[np.int16] | None
    """int16 at the storage rate, shape (frames, channels); None when capture failed."""
    line_ids: tuple[str, ...]
    error: str = ""
    lost_frames: int = 0
    _measures: dict[int, LineMeasures] = field(default_factory=dict, compare=False, repr=False)

    def measures(self, channel: int) -> LineMeasures:
        """The line measures of channel ``channel`` (0-based; computed once)."""
        if self.pcm is None:
            raise ValueError(f"stream {self.stream} has no audio: {self.error}")
        if channel not in self._measures:
            self._measures[channel] = measure(self.pcm[:, channel], self.rate)
        return self._measures[channel]


@dataclass
class Context:
    cfg: Config
    capture_s: float
    manual: bool = True
    """False for an unattended run (fleet command): steps that need a person are skipped."""
    loopback_line: str | None = None
    """The line the test plug is in (set by the session step that asked for it)."""
    _takes: dict[str, Take] = field(default_factory=dict)

    def take(self, section: CaptureSection) -> Take:
        if section.name not in self._takes:
            self._takes[section.name] = capture_take(
                section, self.capture_s, single_stream=len(self.cfg.capture) == 1)
        return self._takes[section.name]

    def forget_takes(self) -> None:
        self._takes.clear()


def capture_take(section: CaptureSection, seconds: float, *, single_stream: bool) -> Take:
    """``seconds`` of audio from ``section``'s source, read as the capture stage reads it."""
    rate = section.storage_rate
    want = max(1, round(seconds * rate))
    try:
        src: CaptureSource = open_source(section)
        src.open(0)
    except ApplianceError as err:
        return Take(section.name, section.device, rate, None, (), error=str(err))
    blocks: list[npt.NDArray[np.int16]] = []
    got = lost = 0
    try:
        while got < want:
            try:
                blk = src.read()
            except SourceExhausted:
                break
            blocks.append(blk.pcm)
            got += blk.frames
            lost += blk.lost_frames
    except AudioError as err:
        return Take(section.name, src.description, rate, None, (), error=str(err))
    finally:
        src.close()
    if not blocks:
        return Take(section.name, src.description, rate, None, (),
                    error=f"{src.description} delivered no audio")
    pcm = np.concatenate(blocks)[:want]
    ids = tuple(section.line_ids(pcm.shape[1], single_stream=single_stream))
    return Take(section.name, src.description, rate, pcm, ids, lost_frames=lost)
