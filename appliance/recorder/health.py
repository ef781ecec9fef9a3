"""Line health: noise floor, peak and clipping, DC offset, mains hum; long-call and silent-line
alarms.

Levels are measured per processed block with numpy and summarised for the status file; they are
telemetry and need no checkpoint. The two alarms depend on time, so they use the journal's
capture clock (not the recorder's) and keep their state in the checkpoint: a replay after a
crash raises the same alarms at the same audio.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.audio.dsp import FLOOR_DBFS

CLIP_LEVEL = 32700
HUM_HZ = (50.0, 60.0)
_NS = 1_000_000_000


@dataclass(frozen=True)
class HealthConfig:
    rate: int = 8000
    long_call_s: float = 4 * 3600.0
    silent_days: float = 7.0


@functools.lru_cache(maxsize=8)
def _hum_basis(n: int, rate: int) -> np.ndarray:
    """(n, 2 * len(HUM_HZ)) real DFT basis of the hum frequencies, cosines then sines (as
    dsp.bin_powers), built once per block length."""
    phase = 2.0 * np.pi * np.outer(np.arange(n, dtype=np.float64), HUM_HZ) / rate
    basis: np.ndarray = np.ascontiguousarray(np.concatenate((np.cos(phase), np.sin(phase)), axis=1))
    basis.flags.writeable = False
    return basis


def _db(power: float) -> float:
    return FLOOR_DBFS if power <= 1e-12 else 10.0 * math.log10(power)


class LineHealth:
    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        # Telemetry (since the last status report).
        self.peak = 0
        self.clipped = 0
        self.dc = 0.0
        self.hum_power = {hz: 0.0 for hz in HUM_HZ}
        self.samples = 0
        # Checkpointed.
        self.last_activity_ns: int | None = None
        self.long_call_raised = False
        self.silent_raised = False

    def measure(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        mag = np.abs(block.astype(np.int32))
        self.peak = max(self.peak, int(mag.max()))
        self.clipped += int(np.count_nonzero(mag >= CLIP_LEVEL))
        x = block.astype(np.float64) / 32768.0
        n = min(x.size, self.cfg.rate)  # hum over at most one second: enough resolution
        self.dc = 0.9 * self.dc + 0.1 * float(x.mean()) if self.samples else float(x.mean())
        if n >= self.cfg.rate // 10:
            y = x[-n:] - x[-n:].mean()
            parts = y @ _hum_basis(n, self.cfg.rate)  # cos parts, then sin parts
            k = len(HUM_HZ)
            powers = 2.0 * (parts[:k] ** 2 + parts[k:] ** 2) / float(n * n)
            for hz, p in zip(HUM_HZ, powers.tolist(), strict=True):
                self.hum_power[hz] = max(self.hum_power[hz], float(p))
        self.samples += block.size

    def check_alarms(self, in_call_frames: int | None, wall_ns: int) -> list[dict[str, Any]]:
        """Alarms newly raised at capture time ``wall_ns``; ``in_call_frames`` is the open call's
        length (None when idle)."""
        out: list[dict[str, Any]] = []
        if in_call_frames is not None or self.last_activity_ns is None:
            self.last_activity_ns = wall_ns
            self.silent_raised = False
        if in_call_frames is None:
            self.long_call_raised = False
        elif not self.long_call_raised and in_call_frames > self.cfg.long_call_s * self.cfg.rate:
            self.long_call_raised = True
            out.append({"kind": "line-long-call", "in_call_s": round(in_call_frames / self.cfg.rate),
                        "limit_s": self.cfg.long_call_s})
        silent_ns = wall_ns - self.last_activity_ns
        if not self.silent_raised and silent_ns > self.cfg.silent_days * 86400 * _NS:
            self.silent_raised = True
            out.append({"kind": "line-silent", "silent_days": round(silent_ns / 86400 / _NS, 2),
                        "limit_days": self.cfg.silent_days})
        return out

    def report(self, noise_floor_db: float) -> dict[str, Any]:
        """Status fields; resets the peak/clip/hum counters."""
        hum_hz = max(self.hum_power, key=lambda hz: self.hum_power[hz])
        out = {
            "noise_floor_db": round(noise_floor_db, 1),
            "peak_dbfs": round(_db((self.peak / 32768.0) ** 2), 1),
            "clipped_samples": self.clipped,
            "dc_offset": round(self.dc, 4),
            "hum_hz": int(hum_hz),
            "hum_dbfs": round(_db(self.hum_power[hum_hz]), 1),
        }
        self.peak = self.clipped = 0
        self.hum_power = {hz: 0.0 for hz in HUM_HZ}
        return out

    def to_state(self) -> dict[str, Any]:
        return {"last_activity_ns": self.last_activity_ns, "long_call": self.long_call_raised,
                "silent": self.silent_raised}

    def restore(self, st: dict[str, Any] | None) -> None:
        if not st:
            return
        self.last_activity_ns = st.get("last_activity_ns")
        self.long_call_raised = bool(st.get("long_call", False))
        self.silent_raised = bool(st.get("silent", False))
