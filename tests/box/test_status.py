"""``appliance status`` tells the truth, in text and in JSON, with the same exit code.

Each case runs the real box (``appliance run``: capture, recorder and uplink processes) in
the situation named, then asks ``appliance status`` twice: as text and as ``--json``.
Lines are simulated; the missing capture device is an ALSA PCM name libasound does not know.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from linerec_contract.pki import ensure_pki
from tests.box.support import (
    RECIPIENT,
    appliance,
    descendants,
    reap_leftovers,
    sim_config,
    wait_for,
)


class Box:
    def __init__(self, cfg: Path, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.log = cfg.parent / "run.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                stdout=out, stderr=out, env=env)
        self.tree: set[int] = set()

    def status(self) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        return (appliance("status", "--config", str(self.cfg)),
                appliance("status", "--json", "--config", str(self.cfg)))

    def json_status(self) -> dict[str, Any]:
        return dict(json.loads(appliance("status", "--json", "--config", str(self.cfg)).stdout))

    def stop(self) -> None:
        self.tree |= descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        reap_leftovers(self.tree)


@pytest.fixture
def boxes() -> Iterator[list[Box]]:
    started: list[Box] = []
    yield started
    for box in started:
        box.stop()


def all_running(box: Box) -> bool:
    st = box.json_status()
    return bool(st.get("stages")) and all(s["running"] for s in st["stages"].values())


def assert_same(text: subprocess.CompletedProcess[str], js: subprocess.CompletedProcess[str],
                code: int) -> dict[str, Any]:
    assert text.returncode == code, (text.stdout, text.stderr)
    assert js.returncode == code, (js.stdout, js.stderr)
    data = dict(json.loads(js.stdout))
    assert data["exit_code"] == code
    return data


def alarm_names(data: dict[str, Any]) -> set[str]:
    return {a["alarm"] for a in data["alarms"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_transport_none_with_lines_is_all_good(tmp_path: Path, boxes: list[Box]) -> None:
    cfg = sim_config(tmp_path, transport="none")
    text = cfg.read_text().replace('realtime = true',
                                   'realtime = true\nlines = [{channel = 1, line = "L1", '
                                   'label = "Front desk"}]')
    cfg.write_text(text)
    box = Box(cfg)
    boxes.append(box)
    wait_for(lambda: all_running(box) and len(box.json_status()["lines"]) == 2, 60,
             "the box to run with its lines")
    out, js = box.status()
    data = assert_same(out, js, 0)
    assert data["verdict"] == "ok" and data["alarms"] == []
    assert "recording, all stages running" in out.stdout
    assert "none" in data["link"]
    assert {ln["line"]: ln["label"] for ln in data["lines"]} == {"L1": "Front desk", "L2": ""}
    assert "Front desk" in out.stdout


def test_missing_capture_device_is_an_alarm(tmp_path: Path, boxes: list[Box]) -> None:
    asound = tmp_path / "asound.conf"
    asound.write_text("pcm.null { type null }\n")  # no PCM of the configured name
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f"""[paths]
state_dir = "{tmp_path / 'state'}"

[[capture]]
name = "main"
source = "alsa"
device = "nosuchcard"
rt_priority = 0

[ring]
size_mb = 2

[seal]
recipients = ["{RECIPIENT}"]

[uplink]
transport = "none"
""")
    box = Box(cfg, env=dict(os.environ, ALSA_CONFIG_PATH=str(asound)))
    boxes.append(box)
    wait_for(lambda: all_running(box) and "device_lost" in alarm_names(box.json_status()), 60,
             "capture to report the missing device")
    out, js = box.status()
    data = assert_same(out, js, 1)
    assert data["verdict"] == "attention"
    lost = next(a for a in data["alarms"] if a["alarm"] == "device_lost")
    assert lost["source"] == "capture-main" and "nosuchcard" in lost["detail"]
    assert lost["hint"] and lost["logs"]
    assert "no-lines" in alarm_names(data)
    assert "ALARM capture-main: device_lost" in out.stdout and "hint:" in out.stdout
    assert "logs:" in out.stdout and "recording, all stages running" not in out.stdout


def test_unreachable_broker_is_attention(tmp_path: Path, boxes: list[Box]) -> None:
    pki = ensure_pki(tmp_path / "pki", ["test-box"])
    cfg = sim_config(tmp_path, transport="mqtt")
    text = cfg.read_text().replace("port = 1\n", f"port = {free_port()}\n")
    text = text.replace(f'"{tmp_path / "ca.pem"}"', f'"{pki.ca_cert}"')
    text = text.replace(f'"{tmp_path / "client.pem"}"', f'"{pki.client_cert("test-box")}"')
    text = text.replace(f'"{tmp_path / "client.key"}"', f'"{pki.client_key("test-box")}"')
    cfg.write_text(text)
    box = Box(cfg)
    boxes.append(box)
    wait_for(lambda: all_running(box) and box.json_status()["lines"], 60, "the box to run")
    out, js = box.status()
    data = assert_same(out, js, 1)
    assert data["verdict"] == "attention"
    down = next(a for a in data["alarms"] if a["alarm"] == "link-down")
    assert down["severity"] == "attention" and "127.0.0.1" in down["detail"]
    assert "ATTENTION uplink: link-down" in out.stdout


def test_stopped_box_is_not_running_at_once(tmp_path: Path, boxes: list[Box]) -> None:
    cfg = sim_config(tmp_path, transport="none")
    box = Box(cfg)
    boxes.append(box)
    wait_for(lambda: all_running(box), 60, "the box to run")
    box.stop()
    # The status files are still fresh: the released locks tell that nothing runs.
    out, js = box.status()
    data = assert_same(out, js, 1)
    assert data["verdict"] == "not running"
    assert not any(s["running"] for s in data["stages"].values())
    assert "NOT RUNNING" in out.stdout


def test_stage_that_stops_reporting_is_not_running(tmp_path: Path, boxes: list[Box]) -> None:
    cfg = sim_config(tmp_path, transport="none")
    box = Box(cfg)
    boxes.append(box)
    wait_for(lambda: all_running(box), 60, "the box to run")
    rec = next(p for p in descendants(box.proc.pid)
               if b"recorder" in Path(f"/proc/{p}/cmdline").read_bytes())
    os.kill(rec, signal.SIGSTOP)  # the test freezes it: its lock stays held
    try:
        wait_for(lambda: not box.json_status()["stages"]["recorder"]["running"], 30,
                 "the recorder's status to go stale")
        out, js = box.status()
        data = assert_same(out, js, 1)
        assert "not-responding" in alarm_names(data)
    finally:
        os.kill(rec, signal.SIGCONT)


def test_never_started_box_is_not_running(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path)
    (tmp_path / "state").mkdir()
    out = appliance("status", "--config", str(cfg))
    js = appliance("status", "--json", "--config", str(cfg))
    assert_same(out, js, 1)


def test_unreadable_state_is_exit_2(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path)
    (tmp_path / "state").write_text("a file, not a folder\n")
    out = appliance("status", "--config", str(cfg))
    js = appliance("status", "--json", "--config", str(cfg))
    data = assert_same(out, js, 2)
    assert data["verdict"] == "unreadable"
    assert len(out.stderr.strip().splitlines()) == 1 and "state_dir" in out.stderr


def fake_running_box(tmp_path: Path, transport: str, unsent_age_s: float) -> Any:
    """A box whose three stages hold their locks (taken here) and report fresh status files,
    with one segment left unsent ``unsent_age_s`` ago."""
    import time

    from appliance import locks
    from appliance.config import load_config

    cfg_path = sim_config(tmp_path, transport=transport,
                          extra="\n[health]\nunsent_limit_s = 60\n")
    cfg = load_config(cfg_path)
    run = cfg.run_dir
    run.mkdir(parents=True)
    now = time.time()
    (run / "capture-main.json").write_text(json.dumps({"ts": now, "state": "running",
                                                       "alarms": [], "lines": []}))
    (run / "recorder.json").write_text(json.dumps({"ts": now, "alarms": [], "lines": [
        {"line": "L1", "in_call": False, "level_db": -60.0}]}))
    (run / "uplink.json").write_text(json.dumps({"ts": now, "link": "ready", "alarms": []}))
    cfg.outbox_dir.mkdir(parents=True)
    seg = cfg.outbox_dir / "seg-000000000001.seg"
    seg.write_bytes(b"x" * 100)
    os.utime(seg, (now - unsent_age_s, now - unsent_age_s))
    for name in ("capture-main", "recorder", "uplink"):
        locks.acquire(cfg.state_dir, name, name)
    return cfg


@pytest.mark.parametrize(("transport", "age", "verdict"), [
    ("mqtt", 10.0, "ok"), ("mqtt", 600.0, "attention"), ("none", 600.0, "ok")])
def test_old_unsent_segments_need_attention_unless_transport_is_none(
        tmp_path: Path, transport: str, age: float, verdict: str) -> None:
    from appliance import locks
    from appliance.status import collect

    cfg = fake_running_box(tmp_path, transport, age)
    try:
        st = collect(cfg)
    finally:
        for name in ("capture-main", "recorder", "uplink"):
            locks.release(name)
    assert st["verdict"] == verdict, st["alarms"]
    assert ("unsent-too-old" in alarm_names(st)) == (verdict == "attention")
