"""PCI masking: DTMF tones (and pause windows) replaced in the stored audio, digits not kept.

A *mask span* is a range of line frames [start, end) whose stored audio is replaced by silence
or by comfort noise at the level measured before the digit. The fill is a pure function of the
frame numbers, the level and the line, so a span masked in pieces (a digit still sounding at the
end of a block, a pre-roll taken from the journal later) gives the same samples as one masked
at once, and a recorder replaying the journal after a crash writes the same bytes.

Pause windows are opened and closed by configured digit sequences (``*1`` / ``*2``) or by a
command from central: :func:`request_pause` writes a small durable request file that the
recorder applies at the audio whose capture time matches the request's time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from linerec_contract.durable import atomic_write_json, ensure_dir
from linerec_contract.errors import FormatError

SILENCE = "silence"
COMFORT_NOISE = "comfort-noise"
MODES = (SILENCE, COMFORT_NOISE)
_NOISE_BLOCK = 4096
PAUSE_DIR = "pci-pause"


@dataclass(frozen=True)
class MaskSpan:
    start: int
    end: int
    level_dbfs: float
    reason: str  # "pci-masked" (a digit) or "pci-pause"

    def to_state(self) -> list[Any]:
        return [self.start, self.end, self.level_dbfs, self.reason]

    @classmethod
    def from_state(cls, st: list[Any]) -> MaskSpan:
        return cls(int(st[0]), int(st[1]), float(st[2]), str(st[3]))


def fill(start: int, end: int, mode: str, level_dbfs: float, seed: int) -> np.ndarray:
    """The masked samples of frames [start, end) (int16)."""
    if end <= start:
        return np.zeros(0, dtype=np.int16)
    if mode == SILENCE:
        return np.zeros(end - start, dtype=np.int16)
    amp = 32768.0 * 10.0 ** (min(level_dbfs, -30.0) / 20.0)
    parts = []
    for k in range(start // _NOISE_BLOCK, (end - 1) // _NOISE_BLOCK + 1):
        rng = np.random.default_rng([seed, k])
        parts.append(rng.standard_normal(_NOISE_BLOCK))
    noise = np.concatenate(parts)
    lo = start - (start // _NOISE_BLOCK) * _NOISE_BLOCK
    clipped = np.clip(np.rint(noise[lo : lo + end - start] * amp), -32768, 32767)
    out: np.ndarray = clipped.astype(np.int16)
    return out


def apply(block: np.ndarray, start: int, spans: list[MaskSpan], mode: str, seed: int) -> np.ndarray:
    """``block`` (frames from ``start``) with every span's frames replaced; a copy if changed."""
    end = start + block.shape[0]
    out = block
    for sp in spans:
        a, b = max(sp.start, start), min(sp.end, end)
        if a < b:
            if out is block:
                out = block.copy()
            out[a - start : b - start] = fill(a, b, mode, sp.level_dbfs, seed)
    return out


# -- pause by command --------------------------------------------------------------------------

def _pause_path(state_dir: Path, line: str) -> Path:
    return state_dir / "recorder" / PAUSE_DIR / f"{line}.json"


MAX_REQUESTS = 32


def request_pause(state_dir: Path, line: str, paused: bool, *, wall_ns: int | None = None) -> int:
    """Open (``paused=True``) or close a PCI pause window on ``line`` (for the fleet command
    handler). The request takes effect at the audio captured at ``wall_ns`` (default: now).
    Requests queue up in one small file per line; returns the new request's id."""
    path = _pause_path(state_dir, line)
    ensure_dir(path.parent)
    queue = read_pause_requests(state_dir, line)
    req_id = queue[-1]["id"] + 1 if queue else 1
    when = time.time_ns() if wall_ns is None else wall_ns
    queue.append({"id": req_id, "paused": bool(paused), "wall_ns": when})
    # Durability: a pause asked for by central survives a power cut until the recorder acts on it.
    atomic_write_json(path, {"requests": queue[-MAX_REQUESTS:]}, mode=0o600)
    return req_id


def read_pause_requests(state_dir: Path, line: str) -> list[dict[str, Any]]:
    """The queued pause requests of ``line``, oldest first."""
    path = _pause_path(state_dir, line)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise FormatError(f"pause request file {path} is unreadable: {err}") from err
    reqs = doc.get("requests") if isinstance(doc, dict) else None
    if not isinstance(reqs, list) or not all(
        isinstance(r, dict) and {"id", "paused", "wall_ns"} <= set(r) for r in reqs
    ):
        raise FormatError(f"pause request file {path}: 'requests' must list id, paused, wall_ns")
    return reqs


class SequenceMatcher:
    """Progress through a digit sequence, without keeping the digits themselves."""

    def __init__(self, sequence: str) -> None:
        self.sequence = sequence
        self.matched = 0

    def feed(self, digit: str) -> bool:
        """True when ``digit`` completes the sequence."""
        if not self.sequence:
            return False
        if digit == self.sequence[self.matched]:
            self.matched += 1
        else:
            self.matched = 1 if digit == self.sequence[0] else 0
        if self.matched == len(self.sequence):
            self.matched = 0
            return True
        return False
