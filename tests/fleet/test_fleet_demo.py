"""The demo shows the fleet: the box enrols, central's fleet service sees it online with fresh
telemetry, and a signed ping answers (real processes, as `make demo` starts them)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from appliance.demo import DEVICE_ID, Demo


def fleet(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "central", "--home", str(home), "fleet", *argv],
                          capture_output=True, text=True, timeout=120, check=False)


def test_demo_box_is_online_with_fresh_telemetry_and_answers_ping(tmp_path: Path) -> None:
    # Real time, so that audio keeps flowing and the recorder applies a PCI pause at the audio
    # captured when it was asked for; the test stops the demo as soon as it has its answers.
    demo = Demo(tmp_path / "demo", 2, realtime=True, seconds=300)
    try:
        home = demo.central_home
        deadline = time.monotonic() + 90
        while True:
            listed = fleet(home, "ls", "--json")
            assert listed.returncode == 0, listed.stderr
            rows = {r["device"]: r for r in json.loads(listed.stdout)}
            row = rows.get(DEVICE_ID, {})
            if row.get("state") == "online" and row.get("telemetry_fresh") and row.get("lines"):
                break
            assert time.monotonic() < deadline, f"box not online with telemetry: {row}"
            time.sleep(1)
        assert row["site"] == "demo" and row["lines"] == 2
        table = fleet(home, "ls")
        assert DEVICE_ID in table.stdout and "online" in table.stdout
        ping = fleet(home, "cmd", DEVICE_ID, "ping")
        assert ping.returncode == 0, (ping.stdout, ping.stderr)
        assert ping.stdout.startswith(f"{DEVICE_ID}: ok")
        assert "online" in demo.read_status()["fleet"]
        shown = fleet(home, "show", DEVICE_ID, "--json")
        tel = json.loads(shown.stdout)["telemetry"]
        [journal] = tel["journal"]
        assert journal["stream"] == "main" and 0 <= journal["unread_pct"] <= 100
        assert {ln["line"] for ln in tel["lines"]} == {"L1", "L2"}
        assert all(isinstance(ln["noise_floor_db"], float) for ln in tel["lines"])
        assert tel["outbox"] and tel["disk"]["total_bytes"] > 0

        def paused(line: str) -> bool | None:
            shown = fleet(home, "show", DEVICE_ID, "--json")
            lines = json.loads(shown.stdout)["telemetry"]["lines"]
            return next((ln["paused"] for ln in lines if ln["line"] == line), None)

        assert paused("L1") is False
        pause = fleet(home, "cmd", DEVICE_ID, "pci-pause", "line=L1")
        assert pause.returncode == 0, pause.stdout
        deadline = time.monotonic() + 60
        while not paused("L1"):  # the recorder took the request, telemetry says so
            assert time.monotonic() < deadline, "line L1 never paused"
            time.sleep(1)
        assert paused("L2") is False
        resume = fleet(home, "cmd", DEVICE_ID, "pci-resume", "line=L1")
        assert resume.returncode == 0, resume.stdout
        while paused("L1"):
            assert time.monotonic() < deadline, "line L1 never resumed"
            time.sleep(1)
    finally:
        demo.stop()
