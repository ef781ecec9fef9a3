"""restart, reboot and a config rollback under ``appliance run``, the box's supervisor where there
is no systemd: a real ``appliance run`` with its real capture (simulated lines), recorder and
uplink stages, a real broker, and central's real ``fleet cmd`` and ``fleet config``.

- ``restart``: the uplink writes a request (appliance.lifecycle), the supervisor stops and starts
  every stage; the new processes come up and the box answers again.
- ``reboot``: refused with the reason (appliance run cannot reboot the machine).
- a pushed config whose capture source is a missing WAV file: capture exits with code 2, the
  supervisor says so in supervisor.json, the box restores the previous config, restarts the
  stages and reports ``rolled-back`` with the stage's own one-line error; a valid push after it
  is applied and the stages run it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config, load_config
from appliance.sync.broker import Broker
from central.fleet.registry import Fleet

from .conftest import box_config, enrol

BASE = ('[[capture]]\nname = "main"\nsource = "simulator"\nsim_lines = 2\n'
        '[health]\ndrain_on_stop_s = 0\n')


def _wait(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _children(cfg: Config) -> dict[str, dict[str, Any]]:
    try:
        out: dict[str, dict[str, Any]] = json.loads(
            (cfg.run_dir / "supervisor.json").read_text())["children"]
    except (OSError, ValueError, KeyError):
        return {}
    return out


def _all_up_since(cfg: Config, since: float, names: tuple[str, ...]) -> bool:
    kids = _children(cfg)
    return all(n in kids and kids[n]["started_at"] > since and kids[n]["ready"]
               and kids[n]["exit_code"] is None for n in names)


STAGES = ("capture-main", "recorder", "uplink")


@pytest.fixture
def running_box(tmp_path: Path, fleet: Fleet, broker: Broker) -> Iterator[tuple[Config, Path]]:
    cfg, path = box_config(tmp_path / "boxes", "box-a", BASE)
    enrol(fleet, cfg, broker.port, tmp_path)
    log_path = tmp_path / "run.log"
    with log_path.open("ab") as log:
        run = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(path)],
                               stdout=log, stderr=log)
    try:
        _wait(lambda: _all_up_since(cfg, 0.0, STAGES), "appliance run's stages up")
        yield cfg, path
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
        assert "Traceback" not in log_path.read_text(), log_path.read_text()


def _cmd(central: Callable[..., tuple[int, str, str]], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = central("cmd", "box-a", *argv, "--json")
    return code, json.loads(out)["box-a"] or {}


def test_restart_reboot_and_a_rolled_back_config_under_appliance_run(
        running_box: tuple[Config, Path], central: Callable[..., tuple[int, str, str]]) -> None:
    cfg, path = running_box
    _wait(lambda: _cmd(central, "ping", "--timeout", "5")[0] == 0, "the box to answer")
    before = _children(cfg)

    # restart: every stage is stopped and started again, by the supervisor.
    t_restart = time.time()
    code, res = _cmd(central, "restart")
    assert code == 0 and res["data"]["by"] == "appliance run", res
    _wait(lambda: _all_up_since(cfg, t_restart, STAGES), "every stage restarted")
    after = _children(cfg)
    assert all(after[n]["pid"] != before[n]["pid"] for n in STAGES)
    assert not (cfg.state_dir / "fleet" / "requests" / "restart").exists()  # done once
    code, res = _cmd(central, "ping", "--timeout", "30")
    assert code == 0 and res["result"] == "ok"  # the new uplink answers

    # reboot: appliance run cannot; refused with the reason, nothing restarted.
    code, res = _cmd(central, "reboot")
    assert code == 1 and res["result"] == "failed" and res["code"] == "not-available", res
    assert "cannot reboot the machine" in res["reason"]
    assert _children(cfg) == after

    # A config that makes capture fail to start: rolled back, reported with the stage's error.
    code, out, err = central(
        "config", "box-a", "--set",
        'capture=[{name = "main", source = "wav", wav_path = "/nonexistent/x.wav"}]',
        "--timeout", "120", "--json")
    assert code == 1, (out, err)
    reported = json.loads(out)["box-a"]["reported"]
    assert reported["result"] == "rolled-back" and reported["version"] == 0, reported
    assert reported["desired_version"] == 1
    assert "stage capture-main exited with code 2" in reported["reason"]
    assert "/nonexistent/x.wav" in reported["reason"]
    overrides = json.loads((cfg.state_dir / "fleet" / "config-overrides.json").read_text())
    assert overrides["version"] == 0 and overrides["overrides"] == {}
    assert load_config(path).capture[0].source == "simulator"
    t_bad = after["capture-main"]["started_at"]
    _wait(lambda: _all_up_since(cfg, t_bad, ("capture-main", "recorder")),
          "capture and recorder running the previous config again")
    assert _children(cfg)["uplink"]["pid"] == after["uplink"]["pid"]  # never restarted

    # A valid push after it (central's desired config drops the bad key): applied, the stages
    # restarted and running it.
    t_good = time.time()
    code, out, err = central("config", "box-a", "--unset", "capture", "--set",
                             "recorder.threshold_db=14",
                             "--timeout", "120", "--json")
    assert code == 0, (out, err)
    reported = json.loads(out)["box-a"]["reported"]
    assert (reported["result"], reported["version"]) == ("applied", 2), reported
    assert _all_up_since(cfg, t_good, ("capture-main", "recorder"))
    assert load_config(path).recorder.threshold_db == 14
