"""While the capture stage runs (and would hold the device), the monitor reads the tail of the
stream's ring journal instead: a real capture process writes the journal here."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.monitor.test_monitor_tmux import level, rows, write_config


def test_monitor_reads_the_journal_while_capture_runs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, masking=False)
    capture = subprocess.Popen([sys.executable, "-m", "appliance", "stage", "capture", "--config",
                                str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        status = tmp_path / "state" / "run" / "capture-main.json"
        deadline = time.monotonic() + 30
        while not status.exists():
            assert capture.poll() is None, capture.stderr.read() if capture.stderr else ""
            assert time.monotonic() < deadline, "the capture stage never reported status"
            time.sleep(0.1)
        p = subprocess.run([sys.executable, "-m", "appliance", "monitor", "--config", str(cfg),
                            "--seconds", "2.5"], capture_output=True, text=True, timeout=60,
                           check=False)
    finally:
        capture.terminate()
        capture.communicate(timeout=30)
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().split("\n\n")[-1]
    assert f" main: journal {tmp_path}" in last  # the row is cut at 80 columns
    r = rows(last.splitlines())
    assert abs(level(r["L3"]) - -20.0) < 1.0
    assert all(level(r[ln]) < -70.0 for ln in ("L1", "L4"))
