"""Desired/reported config: applied and reported; invalid refused with the old kept; a config
that makes a real stage fail to start rolled back.

systemd cannot run here, so the test plays the supervisor: its restart hook stops and starts a
real capture stage process (``appliance stage capture main``) the way the box's systemd units
would, and the box's own ``watch_stages`` decides whether it came up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.sync.broker import Broker
from appliance.sync.fleet_config import stage_status_files, watch_stages
from central.fleet.registry import Fleet
from linerec_contract.pki import ensure_pki

from .conftest import Box

BASE = '[[capture]]\nname = "main"\nsource = "simulator"\nsim_lines = 2\n'


class CaptureSupervisor:
    """Stands in for systemd: one real capture stage process, restarted on request."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self) -> str:
        self._stop()
        cfg = load_config(self.config)
        since = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "stage", "capture", "main", "--config",
             str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.starts += 1
        proc = self.proc

        def exited() -> str:
            code = proc.poll()
            if code is None:
                return ""
            err = (proc.stderr.read().decode(errors="replace").strip().splitlines() or [""])[-1] \
                if proc.stderr else ""
            return f"stage capture-main exited with code {code}: {err}"

        files = {k: v for k, v in stage_status_files(cfg).items() if k.startswith("capture-")}
        return watch_stages(files, since, 60.0, exited)

    def close(self) -> None:
        self._stop()


@pytest.fixture
def supervised_box(start_box: Callable[..., Box], tmp_path: Path) -> Iterator[tuple[Box, CaptureSupervisor]]:
    sup = CaptureSupervisor(tmp_path / "boxes" / "box-a" / "appliance.toml")
    box = start_box("box-a", extra=BASE, restart=sup.restart)
    assert sup.restart() == ""  # the stage runs with the box's own config
    try:
        yield box, sup
    finally:
        sup.close()


def _overrides(box: Box) -> dict[str, object]:
    return json.loads((box.cfg.state_dir / "fleet" / "config-overrides.json").read_text())


def test_config_push_applied_refused_and_rolled_back(
        supervised_box: tuple[Box, CaptureSupervisor], broker: Broker, fleet: Fleet,
        central: Callable[..., tuple[int, str, str]]) -> None:
    ensure_pki(fleet.pki.dir, ["central"])  # a central certificate for the stock subscriber
    box, sup = supervised_box
    deadline = time.monotonic() + 30
    while box.uplink._link != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    code, out, err = central("config", "box-a", "--set", "fleet.telemetry_interval_s=2",
                             "--json")
    assert code == 0, (out, err)
    reported = json.loads(out)["box-a"]["reported"]
    assert (reported["result"], reported["version"]) == ("applied", 1)
    assert _overrides(box)["version"] == 1
    assert load_config(sup.config).fleet.telemetry_interval_s == 2.0  # stages see it
    assert box.agent.config_version() == 1
    # The retained birth now names the running config version (published right after the
    # report, so a reader may briefly still get the previous one).
    deadline = time.monotonic() + 30
    while True:
        status = subprocess.run(
            ["mosquitto_sub", "-V", "5", "-h", broker.host, "-p", str(broker.port), "--cafile",
             str(fleet.pki.ca_cert), "--cert", str(fleet.pki.client_cert("central")), "--key",
             str(fleet.pki.client_key("central")), "-t", "rec/v1/box-a/status", "-C", "1",
             "-W", "10"], capture_output=True, text=True, timeout=60, check=False)
        birth = json.loads(status.stdout)
        if birth["config_version"] == 1:
            break
        assert time.monotonic() < deadline, birth
        time.sleep(0.2)
    assert birth["state"] == "online"
    starts = sup.starts

    code, out, err = central("config", "box-a", "--set", "recorder.threshold_db=1000", "--json")
    assert code == 1
    reported = json.loads(out)["box-a"]["reported"]
    assert reported["result"] == "refused" and reported["version"] == 1
    assert "recorder.threshold_db" in reported["reason"]
    assert _overrides(box)["version"] == 1 and sup.starts == starts  # nothing restarted
    assert "not applied (yet) on: box-a" in err

    code, out, err = central(
        "config", "box-a", "--unset", "recorder.threshold_db", "--set",
        'capture=[{name = "main", source = "wav", wav_path = "/nonexistent/x.wav"}]', "--json")
    assert code == 1, out
    reported = json.loads(out)["box-a"]["reported"]
    assert reported["result"] == "rolled-back" and reported["version"] == 1
    assert "capture-main exited with code 2" in reported["reason"]
    assert "/nonexistent/x.wav" in reported["reason"]
    assert _overrides(box)["version"] == 1
    assert load_config(sup.config).capture[0].source == "simulator"
    assert sup.proc is not None and sup.proc.poll() is None  # the old config runs again
    assert box.agent.config_version() == 1


def test_a_stopping_stage_last_status_is_not_taken_for_the_new_one(tmp_path: Path) -> None:
    """A stage being stopped for a restart writes a last status after the request: only a status
    from another process than before the restart says the stage came back."""
    from linerec_contract.durable import write_status

    status = tmp_path / "recorder.json"
    files = {"recorder": status}
    write_status(status, {"ts": time.time(), "pid": 4242})
    old = {"recorder": 4242}
    since = time.time()
    time.sleep(0.01)
    write_status(status, {"ts": time.time(), "pid": 4242})  # the old one, stopping
    assert watch_stages(files, since, 0.3, lambda: "", old_pids=old) == \
        "stage recorder did not start within 0 s"
    write_status(status, {"ts": time.time(), "pid": 4343})  # the new one
    assert watch_stages(files, since, 0.3, lambda: "", old_pids=old) == ""
