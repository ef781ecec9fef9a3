"""Writer process for test_ring_kill: appends deterministic records until SIGKILLed.

Runs as ``python -m tests.buffer.ring_kill_child PATH SLOTS`` or forked by the test (``run``).
Reports on a file descriptor, one line per event, written with os.write so nothing sits in a buffer:
``open <next_seq>`` after recovery, ``app <seq> <synced_seq or -1>`` after each append returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from appliance.buffer import RingWriter, SampleFormat


def payload(seq: int) -> bytes:
    """The deterministic payload of ``seq`` (frames = 50 + seq % 200, mono S16)."""
    frames = 50 + seq % 200
    return (seq.to_bytes(8, "little") * frames)[: frames * 2]


def run(path: Path, slots: int, out_fd: int) -> None:
    """Open (recover) the ring and append forever, reporting to ``out_fd``."""
    w = RingWriter.open(path, stream_id=3, size_bytes=4096 + slots * 4096, slot_size=4096,
                        sync_interval_s=0.003)
    os.write(out_fd, f"open {w.next_seq}\n".encode())
    while True:
        seq = w.next_seq
        data = payload(seq)
        w.append(data, frames=len(data) // 2, channels=1, rate=8000,
                 sample_format=SampleFormat.S16_LE, frame_pos=seq * 1000)
        synced = w.synced_seq
        os.write(out_fd, f"app {seq} {-1 if synced is None else synced}\n".encode())


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), 1)
