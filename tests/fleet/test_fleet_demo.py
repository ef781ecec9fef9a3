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

        # PCI pause from central: the command answers with the request's id, and the recorder's
        # durable state shows it took that request (pause windows open at the audio of the
        # request's time and close at the call's end, so the live "paused" flag may be brief).
        state = demo.box_dir / "recorder" / "state.json"

        def taken(line: str) -> int:
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return 0
            lines = doc["streams"]["main"]["lines"]
            return next((int(ln.get("pause_cmd", 0)) for ln in lines if ln["line"] == line), 0)

        for name in ("pci-pause", "pci-resume"):
            sent = fleet(home, "cmd", DEVICE_ID, name, "line=L1", "--json")
            assert sent.returncode == 0, sent.stdout
            request = json.loads(sent.stdout)[DEVICE_ID]["data"]["request"]
            deadline = time.monotonic() + 120
            while taken("L1") < request:
                assert time.monotonic() < deadline, f"the recorder never took {name} {request}"
                time.sleep(0.5)
        assert taken("L2") == 0
    finally:
        demo.stop()
