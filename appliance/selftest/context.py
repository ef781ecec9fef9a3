"""What the checks of one run share: the config, and the audio taken once per capture stream."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.audio.source import AudioError, CaptureSource, SourceExhausted, open_source
from appliance.config import CaptureSection, Config
from appliance.selftest.signal import LineMeasures, measure
from linerec_contract.errors import ApplianceError

STATUS_FRESH_S = 10.0
"""The capture stage rewrites its status file about once a second."""


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
        """Audio of ``section``: from its source, or from the journal while capture runs (the
        capture stage holds the device, and a self-test must never interrupt recording)."""
        if section.name not in self._takes:
            single = len(self.cfg.capture) == 1
            if capture_running(self.cfg, section):
                take = journal_take(self.cfg, section, self.capture_s, single_stream=single)
            else:
                take = capture_take(section, self.capture_s, single_stream=single)
            self._takes[section.name] = take
        return self._takes[section.name]

    def forget_takes(self) -> None:
        self._takes.clear()


def capture_status(cfg: Config, section: CaptureSection) -> dict[str, Any] | None:
    """The capture stage's status file for ``section`` when the stage is running, else None."""
    try:
        data = json.loads((cfg.run_dir / f"capture-{section.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("state") == "stopped":
        return None
    if time.time() - float(data.get("ts", 0)) >= STATUS_FRESH_S:
        return None
    return data


def capture_running(cfg: Config, section: CaptureSection) -> bool:
    return capture_status(cfg, section) is not None


def journal_take(cfg: Config, section: CaptureSection, seconds: float, *,
                 single_stream: bool) -> Take:
    """The newest ``seconds`` of contiguous audio in ``section``'s journal (capture running)."""
    from appliance.buffer import RingReader
    from appliance.buffer.format import SampleFormat

    path = cfg.ring_path(section.name)
    rate = section.storage_rate
    what = f"journal {path} (capture is running)"
    want = max(1, round(seconds * rate))
    records = []
    try:
        with RingReader(path) as reader:
            seq = reader.newest_seq()
            got = 0
            while seq is not None and seq >= 0 and got < want:
                rec = reader.get(seq)
                if rec is None:
                    break
                if rec.sample_format != SampleFormat.S16_LE or rec.rate != rate:
                    return Take(section.name, what, rate, None, (),
                                error=f"{path} holds {rec.sample_format.name} at {rec.rate} Hz, "
                                      f"not S16_LE at {rate} Hz")
                records.append(rec)
                got += rec.frames
                if rec.gap_frames:
                    break  # audio before a gap does not join the audio after it
                seq -= 1
    except (ApplianceError, OSError) as err:
        return Take(section.name, what, rate, None, (), error=f"cannot read {path}: {err}")
    if not records:
        return Take(section.name, what, rate, None, (), error=f"{path} holds no audio yet")
    channels = records[0].channels
    pcm = np.concatenate([np.frombuffer(r.payload, dtype="<i2").reshape(-1, channels)
                          for r in reversed(records)]).astype(np.int16)[-want:]
    ids = tuple(section.line_ids(channels, single_stream=single_stream))
    return Take(section.name, what, rate, pcm, ids)


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
