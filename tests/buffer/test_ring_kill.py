"""A real writer process SIGKILLed at random moments, restarted, and the journal checked each time.

Most runs fork the writer from this (already imported) process to keep the test fast; a share run
as a fresh ``python -m tests.buffer.ring_kill_child`` subprocess. Either way it is a separate OS
process writing a real file, killed with SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.buffer import Gap, Record, RingReader

from .ring_kill_child import payload, run

SLOTS = 64
FORK_KILLS = 220
SUBPROCESS_KILLS = 20
REPO = Path(__file__).resolve().parents[2]


def _forked(path: Path, delay: float) -> bytes:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer process
        code = 0
        try:
            os.close(rfd)
            run(path, SLOTS, wfd)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    chunks = []
    while chunk := os.read(rfd, 1 << 16):
        chunks.append(chunk)
    os.close(rfd)
    return b"".join(chunks)


def _spawned(path: Path, delay: float) -> bytes:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.buffer.ring_kill_child", str(path), str(SLOTS)],
        cwd=REPO, stdout=subprocess.PIPE,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return out


def _check_ring(path: Path) -> tuple[int | None, list[str]]:
    """Newest seq and the problems found reading the whole ring."""
    problems: list[str] = []
    with RingReader(path) as r:
        newest = r.newest_seq()
        items: list[Record | Gap] = []
        while batch := r.poll(64):
            items.extend(batch)
    seqs = [it.seq for it in items if isinstance(it, Record)]
    problems += [f"gap {g}" for g in items if isinstance(g, Gap)]
    if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        problems.append(f"records not consecutive: {seqs}")
    problems += [f"payload of {it.seq} differs" for it in items
                 if isinstance(it, Record) and it.payload != payload(it.seq)]
    if seqs and seqs[-1] != newest:
        problems.append(f"reader ended at {seqs[-1]}, newest is {newest}")
    return newest, problems


def test_sigkill_writer_loses_nothing(tmp_path: Path, ring_summary: list[str]) -> None:
    path = tmp_path / "k.ring"
    rng = random.Random(20240611)
    highest = -1  # highest seq any writer reported as appended, or found in the file
    opened = kills = 0
    problems: list[str] = []
    for i in range(FORK_KILLS + SUBPROCESS_KILLS):
        if i % ((FORK_KILLS + SUBPROCESS_KILLS) // SUBPROCESS_KILLS) == 0:
            out = _spawned(path, rng.uniform(0.0, 0.8))
        else:
            out = _forked(path, rng.uniform(0.0, 0.03))
        kills += 1
        lines = [ln.split() for ln in out.decode().splitlines()]
        appended = [int(ln[1]) for ln in lines if ln[0] == "app"]
        synced = max((int(ln[2]) for ln in lines if ln[0] == "app"), default=-1)
        for ln in lines:
            if ln[0] == "open":
                opened += 1
                if int(ln[1]) <= highest:
                    problems.append(f"kill {i}: writer resumed at {ln[1]}, seq {highest} exists")
        if appended and appended != list(range(appended[0], appended[-1] + 1)):
            problems.append(f"kill {i}: appended seqs not consecutive")
        if not path.exists():
            continue  # killed before the journal was created
        newest, found = _check_ring(path)
        problems += [f"kill {i}: {p}" for p in found]
        last = appended[-1] if appended else highest
        if newest is None and last >= 0 or newest is not None and newest < max(last, synced):
            problems.append(
                f"kill {i}: newest {newest}, but {last} was appended and {synced} synced"
            )
        highest = max(highest, last, -1 if newest is None else newest)
    summary = (
        f"SIGKILLs: {kills} ({opened} after the writer had recovered), highest seq {highest}, "
        f"problems: {len(problems)}"
    )
    print(summary)
    ring_summary.append(summary)
    assert not problems, "\n".join(problems[:20])
    assert opened >= 150 and highest > 5 * SLOTS
