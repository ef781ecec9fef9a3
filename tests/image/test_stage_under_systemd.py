"""A stage started by a systemd unit has PID 1 as parent: it must run, while a stage orphaned by
its supervisor (``appliance run``) must stop. Real processes, orphaned through ``sh &``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])  # state, ppid


def _orphan_stage(tmp_path: Path, env_prefix: str) -> int:
    cfg = tmp_path / "box.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n[uplink]\ntransport = "none"\n')
    pidfile = tmp_path / "pid"
    subprocess.run(["sh", "-c", f"{env_prefix} {sys.executable} -m appliance stage uplink "
                    f"--config {cfg} >{tmp_path / 'log'} 2>&1 & echo $! > {pidfile}"], check=True,
                   env={k: v for k, v in os.environ.items() if k != "INVOCATION_ID"})
    return int(pidfile.read_text())


def _log(folder: Path) -> str:
    try:
        return (folder / "log").read_text()
    except FileNotFoundError:  # the shell has not opened it yet
        return ""


def _wait(cond: object, timeout: float = 240.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_stage_with_pid1_parent_runs_under_systemd_and_stops_as_an_orphan(tmp_path: Path) -> None:
    unit = tmp_path / "unit"
    unit.mkdir()
    pid = _orphan_stage(unit, "env INVOCATION_ID=0123456789abcdef")
    try:
        st = _stat(pid)
        if st is None or st[1] != 1:
            pytest.skip("orphans are not reparented to PID 1 here (a subreaper is in the way)")
        assert _wait(lambda: "segments stay in the outbox" in _log(unit))
        st = _stat(pid)
        assert st is not None and st[0] not in ("Z", "X"), _log(unit)
    finally:
        os.kill(pid, 15)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    pid = _orphan_stage(orphan, "env")
    # Without INVOCATION_ID the orphan stops itself before doing any work.
    assert _wait(lambda: (s := _stat(pid)) is None or s[0] in ("Z", "X"))
    assert "segments stay in the outbox" not in _log(orphan)
