"""Helpers for the sealed-segment tests: speech-like audio and segment inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from linerec_contract.segment import SegmentInput

DEVICE = "box-0001"


def speechish(seconds: float, rate: int = 8000, seed: int = 0) -> np.ndarray:
    """Noise with syllable-rate amplitude modulation and pauses: enough to exercise codecs."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    noise = rng.standard_normal(n)
    smooth = np.convolve(noise, np.ones(4) / 4, mode="same")
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.3 * t) > -0.3)
    return (smooth * envelope * 6000).astype(np.int16)


def make_input(pcm: np.ndarray | None = None, **over: Any) -> SegmentInput:
    fields: dict[str, Any] = {
        "line": "line-1",
        "call_id": "call-abc",
        "part": 0,
        "last_part": True,
        "start_frame": 16000,
        "start_wall_ns": 1_700_000_000_000_000_000,
        "rate": 8000,
        "pcm": speechish(0.05) if pcm is None else pcm,
        "sensitive": {"dtmf": "4929123456781234", "caller": "+4930123456"},
        "gaps": [],
    }
    fields.update(over)
    return SegmentInput(**fields)
