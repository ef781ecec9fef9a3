"""Helpers for the central tests: a simulated box that seals calls of a known signal."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from linerec_contract.identity import DeviceKey
from linerec_contract.segment import SealedSegment, SegmentInput, seal_segment

DEVICE = "box-1"
RATE = 8000
START_NS = 1_700_000_000_000_000_000


def known_signal(frames: int, seed: int = 1) -> np.ndarray:
    """A deterministic int16 signal: a chirp plus noise, full of distinct sample values."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / RATE
    tone = 9000 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    return (tone + rng.normal(0, 800, frames)).clip(-32768, 32767).astype(np.int16)


@dataclass
class Box:
    """A simulated box: its key, the next seq and the previous manifest hash."""

    device_id: str
    key: DeviceKey
    recipients: list[str]
    seq: int = 0
    prev: str | None = None
    sealed: list[SealedSegment] = field(default_factory=list)

    def seal_call(
        self, call_id: str, signal: np.ndarray, parts: int, *, line: str = "line-1",
        start_frame: int = 48_000, start_ns: int = START_NS, codec: str = "flac",
        key: DeviceKey | None = None, next_key: DeviceKey | None = None,
        sensitive: dict[str, object] | None = None,
    ) -> list[SealedSegment]:
        """Cut ``signal`` into ``parts`` consecutive, sample-exact parts and seal each (with
        ``key`` instead of the box's own; the last part announcing ``next_key``)."""
        bounds = np.linspace(0, signal.size, parts + 1).astype(int)
        out = []
        for part in range(parts):
            lo, hi = int(bounds[part]), int(bounds[part + 1])
            inp = SegmentInput(
                line=line, call_id=call_id, part=part, last_part=part == parts - 1,
                start_frame=start_frame + lo, start_wall_ns=start_ns + lo * 1_000_000_000 // RATE,
                rate=RATE, pcm=signal[lo:hi],
                sensitive={"dtmf": "1234"} if sensitive is None else sensitive, gaps=[],
            )
            seg = seal_segment(
                inp, device_id=self.device_id, seq=self.seq, prev_manifest_sha256=self.prev,
                recipients=self.recipients, key=key or self.key, codec=codec,
                next_key=next_key if part == parts - 1 else None,
            )
            self.seq += 1
            self.prev = seg.manifest_sha256
            out.append(seg)
        self.sealed.extend(out)
        return out
