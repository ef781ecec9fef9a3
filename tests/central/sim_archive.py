"""A small archive made the way the product makes it: simulated lines (the only fake: there is
no phone line here) through the real recorder and sealer, delivered to central's real intake.

Some calls get an FSK caller-ID burst (Bell 202, a number the test chooses) in the idle before
them, as an exchange sends it between rings, so the archive holds inbound calls with a caller ID
next to outbound calls with dialled digits. The truth each test compares with is the
simulator's own call list plus the numbers added here, never what central computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.audio import callerid
from appliance.audio.simulator import LineSimulator, SimCall
from appliance.recorder.service import Recorder
from central.home import Home, init_home
from central.receiver import SegmentIntake
from linerec_contract.identity import DeviceKey
from linerec_contract.protocol import segment_topic
from linerec_contract.segment import encode_wire
from tests.recorder.recorder_support import (
    RATE,
    drain,
    outbox_segments,
    recorder_config,
    write_ring,
)

BASE_NS = 1_700_000_000_000_000_000  # wall clock of frame 0 (recorder_support.write_ring)
NS_PER_FRAME = 1_000_000_000 // RATE
SECONDS = 150.0
BURST_LEAD_S = 2.0  # the caller-ID burst ends this long before the call's first tone


@dataclass(frozen=True)
class TruthCall:
    device: str
    line: str  # as the recorder names it: L1, L2, ...
    start_frame: int
    end_frame: int
    digits: str
    caller: str | None

    @property
    def start_ns(self) -> int:
        return BASE_NS + self.start_frame * NS_PER_FRAME

    @property
    def seconds(self) -> float:
        return (self.end_frame - self.start_frame) / RATE


@dataclass
class SimArchive:
    home: Home
    truth: list[TruthCall]
    total_frames: int
    # what each box's lines carried: render(start_frame, frames) -> int16 (frames, lines)
    renders: dict[str, Callable[[int, int], np.ndarray]]


def _with_caller_ids(sim: LineSimulator, bursts: dict[tuple[int, int], np.ndarray]
                     ) -> Callable[[int, int], np.ndarray]:
    def render(start: int, frames: int) -> np.ndarray:
        out = sim.render(start, frames).astype(np.int32)
        for (line, at), burst in bursts.items():
            lo, hi = max(start, at), min(start + frames, at + burst.size)
            if lo < hi:
                out[lo - start : hi - start, line] += burst[lo - at : hi - at]
        return out.clip(-32768, 32767).astype(np.int16)

    return render


def add_box(home: Home, folder: Path, device: str, seed: int, *, pci_masking: bool = False,
            renders: dict[str, Callable[[int, int], np.ndarray]] | None = None
            ) -> list[TruthCall]:
    """Record SECONDS of two simulated lines on box ``device`` and deliver every segment to
    central's intake; returns the simulator's calls (with the caller IDs added here)."""
    recorder = "max_segment_s = 8.0\ncommit_interval_s = 0.2"
    if pci_masking:
        recorder += "\npci_masking = true"
    cfg = recorder_config(folder / device, home.recipients()[0], device=device,
                          recorder=recorder)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    home.enroll(device, key.public_b64)
    sim = LineSimulator(2, RATE, seed=seed, mean_idle_s=9.0, mean_call_s=14.0, max_call_s=30.0)
    total = int(SECONDS * RATE)
    calls: list[SimCall] = sim.calls_between(0, total)
    bursts: dict[tuple[int, int], np.ndarray] = {}
    callers: dict[tuple[int, int], str] = {}
    previous_end = dict.fromkeys(range(sim.lines), 0)
    for n, call in enumerate(calls):
        idle = call.start_frame - previous_end[call.line]
        previous_end[call.line] = call.end_frame
        if n % 2 == 0 and idle > 12 * RATE:  # room after the previous call's hang-over
            number = f"0301555{1000 + n:04d}"
            burst = np.rint(callerid.fsk(callerid.build_message(number, "ANNE")) * 32768)
            at = call.start_frame - int(BURST_LEAD_S * RATE) - burst.size
            bursts[(call.line, at)] = burst.astype(np.int32)
            callers[(call.line, call.start_frame)] = number
    render = _with_caller_ids(sim, bursts)
    if renders is not None:
        renders[device] = render
    write_ring(cfg, render, sim.lines, SECONDS)
    drain(Recorder(cfg, recipients=home.recipients(), key=key))
    intake = SegmentIntake(home)
    for seg in outbox_segments(cfg):
        out = intake.handle(segment_topic(device, seg.seq), encode_wire(seg))
        assert out.ack is not None and out.ack.result == "stored", out.detail
    intake.close()
    return [TruthCall(device, f"L{c.line + 1}", c.start_frame, c.end_frame, c.digits,
                      callers.get((c.line, c.start_frame))) for c in calls]


def build(folder: Path) -> SimArchive:
    """Two boxes: ``box-sim`` keeps digits, ``box-pci`` masks them (PCI)."""
    home = init_home(folder / "central")
    renders: dict[str, Callable[[int, int], np.ndarray]] = {}
    truth = add_box(home, folder, "box-sim", 3, renders=renders)
    truth += add_box(home, folder, "box-pci", 5, pci_masking=True, renders=renders)
    return SimArchive(home, truth, int(SECONDS * RATE), renders)
