"""Shared by the recorder-service tests: a box config, a ring filled from a render function,
the outbox's sealed segments, and running a recorder until the journal is consumed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.buffer import RingWriter, SampleFormat
from appliance.config import Config, parse_config
from appliance.recorder.service import Recorder
from linerec_contract.segment import SealedSegment, decode_wire

RATE = 8000
PERIOD = 160
DEFAULT_RECORDER = "max_segment_s = 20.0\ncommit_interval_s = 0.2"


def config_text(state: Path, recipient: str, *, device: str = "rec-test",
                recorder: str = DEFAULT_RECORDER, uplink: str = "") -> str:
    """A simulator box with the uplink off; ``recorder``/``uplink`` go into their sections."""
    return f"""
[device]
id = "{device}"
[paths]
state_dir = "{state}"
[[capture]]
source = "simulator"
[recorder]
{recorder}
[seal]
recipients = ["{recipient}"]
[uplink]
transport = "none"
{uplink}
"""


def recorder_config(state: Path, recipient: str, **sections: str) -> Config:
    return parse_config(config_text(state, recipient, **sections))


def write_ring(cfg: Config, render: Callable[[int, int], np.ndarray], lines: int,
               seconds: float) -> int:
    """Fill the stream's journal with ``seconds`` of ``render`` as capture would; frames."""
    path = cfg.ring_path("main")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = RingWriter.open(path, stream_id=1, size_bytes=64 * 2**20, sync_interval_s=0.5)
    total = int(seconds * RATE)
    for pos in range(0, total, PERIOD):
        pcm = render(pos, PERIOD)
        writer.append(pcm.tobytes(), frames=PERIOD, channels=lines, rate=RATE,
                      sample_format=SampleFormat.S16_LE, frame_pos=pos,
                      wall_ns=1_700_000_000_000_000_000 + pos * 125_000)
    writer.close()
    return total


def outbox_segments(cfg: Config) -> list[SealedSegment]:
    return [decode_wire(p.read_bytes()) for p in sorted(cfg.outbox_dir.glob("seg-*.seg"))]


def drain(recorder: Recorder) -> None:
    """Step until the journal holds nothing new, then checkpoint."""
    while recorder.step():
        continue
    recorder.checkpoint()
