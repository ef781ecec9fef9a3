"""Signed commands over MQTT v5 request/response, against a real broker and a real box agent."""

from __future__ import annotations

import json
import shlex
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.selftest.store import status_summary
from appliance.sync.broker import Broker
from appliance.sync.uplink_base import boot_id
from central.fleet.link import operator_tls
from central.fleet.registry import Fleet
from linerec_contract.fleet_protocol import (
    CommandResult,
    cmd_req_topic,
    cmd_res_topic,
    sign_command,
)
from linerec_contract.identity import DeviceKey

from .conftest import Box


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Central:
    """A raw central MQTT client: publishes exactly the bytes a test hands it."""

    def __init__(self, broker: Broker, tls: ssl.SSLContext, dev: str) -> None:
        self.results: dict[bytes, CommandResult] = {}
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
        self.c.tls_set_context(tls)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *a: c.subscribe(cmd_res_topic(dev), qos=1)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self.ready.wait(30)

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.results[msg.properties.CorrelationData] = CommandResult.decode(msg.payload)

    def ask(self, dev: str, payload: bytes, corr: bytes) -> CommandResult:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = cmd_res_topic(dev)
        props.CorrelationData = corr
        self.c.publish(cmd_req_topic(dev), payload, qos=1, properties=props)
        _wait(lambda: corr in self.results, f"answer {corr!r}")
        return self.results[corr]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def box(start_box: Callable[..., Box]) -> Box:
    b = start_box("box-a")
    _wait(lambda: b.uplink._link == "ready", "box online")
    return b


def test_refusals_each_with_its_reason(fleet: Fleet, broker: Broker, box: Box) -> None:
    key = fleet.command_key()
    with operator_tls(fleet, "test") as tls:
        central = Central(broker, tls, "box-a")
        try:
            good = sign_command(key, name="ping", device="box-a")
            assert central.ask("box-a", good.encode(), b"good").result == "ok"  # control

            replay = central.ask("box-a", good.encode(), b"replay")
            unsigned = sign_command(key, name="ping", device="box-a")
            unsigned_doc = json.loads(unsigned.encode())
            unsigned_doc["sig"] = ""
            r_unsigned = central.ask("box-a", json.dumps(unsigned_doc).encode(), b"unsigned")
            other = DeviceKey.generate()
            r_other = central.ask("box-a", sign_command(other, name="ping", device="box-a")
                                  .encode(), b"other")
            # Central's key id but another key's signature: a forged signature.
            forged = sign_command(other, name="ping", device="box-a")
            forged_doc = json.loads(forged.encode())
            forged_doc["key_id"] = key.key_id
            r_forged = central.ask("box-a", json.dumps(forged_doc).encode(), b"forged")
            # A valid command whose body was altered after signing.
            tampered_doc = json.loads(sign_command(key, name="ping", device="box-a").encode())
            tampered_doc["name"] = "reboot"
            r_tampered = central.ask("box-a", json.dumps(tampered_doc).encode(), b"tampered")
            expired = sign_command(key, name="ping", device="box-a", ttl_s=5,
                                   now=time.time() - 60)
            r_expired = central.ask("box-a", expired.encode(), b"expired")
            mis = sign_command(key, name="ping", device="box-b")
            r_mis = central.ask("box-a", mis.encode(), b"misaddressed")
            r_garbage = central.ask("box-a", b"{not json", b"garbage")
        finally:
            central.close()
    assert (replay.result, replay.code) == ("refused", "replayed")
    assert (r_unsigned.result, r_unsigned.code) == ("refused", "unsigned")
    assert (r_other.result, r_other.code) == ("refused", "unknown-key")
    assert other.key_id in r_other.reason
    assert (r_forged.result, r_forged.code) == ("refused", "bad-signature")
    assert (r_tampered.result, r_tampered.code) == ("refused", "bad-signature")
    assert (r_expired.result, r_expired.code) == ("refused", "expired")
    assert (r_mis.result, r_mis.code) == ("refused", "misaddressed")
    assert "box-b" in r_mis.reason
    assert (r_garbage.result, r_garbage.code) == ("refused", "malformed")
    # Nothing refused ran: only the control ping was counted as accepted.
    assert box.agent.counters["refused"] == 8


def test_replay_is_refused_after_the_box_restarts(fleet: Fleet, broker: Broker,
                                                  start_box: Callable[..., Box]) -> None:
    box = start_box("box-a")
    _wait(lambda: box.uplink._link == "ready", "box online")
    cmd = sign_command(fleet.command_key(), name="ping", device="box-a", ttl_s=600)
    with operator_tls(fleet, "test") as tls:
        central = Central(broker, tls, "box-a")
        try:
            assert central.ask("box-a", cmd.encode(), b"first").result == "ok"
            box.close()
            # A new agent process on the same state folder (the box restarted) refuses the
            # captured command: the nonce store is durable.
            again = start_box("box-a")
            _wait(lambda: again.uplink._link == "ready", "box online again")
            replay = central.ask("box-a", cmd.encode(), b"after restart")
            assert (replay.result, replay.code) == ("refused", "replayed")
        finally:
            central.close()


def test_cli_cmd_ping_and_the_commands(central: Callable[..., tuple[int, str, str]],
                                       box: Box, tmp_path: Path) -> None:
    code, out, err = central("cmd", "box-a", "ping", "--json")
    assert code == 0, err
    answer = json.loads(out)["box-a"]
    assert answer["result"] == "ok" and answer["data"]["boot_id"] == boot_id()

    # The remote self-test runs the box's unattended checks and keeps the result as its last.
    code, out, err = central("cmd", "box-a", "selftest", "--json", "--timeout", "180")
    answer = json.loads(out)["box-a"]
    assert answer is not None and answer["result"] == "ok", out
    kept = status_summary(box.cfg)
    assert kept is not None and answer["data"]["selftest"]["finished_ns"] == kept["finished_ns"]
    assert kept["verdict"] in ("PASS", "WARN", "FAIL")
    assert code == 0

    code, out, err = central("cmd", "box-a", "restart")
    assert code == 1 and "nothing supervises" in out  # no request without a supervisor

    code, out, err = central("cmd", "box-a", "rotate-keys", "--json")
    assert code == 0, out
    from appliance.recorder.service import NEXT_KEY_FILE
    from linerec_contract.identity import DeviceKey as Key

    pending = Key.load(box.cfg.keys_dir / NEXT_KEY_FILE)
    assert json.loads(out)["box-a"]["data"]["key_id"] == pending.key_id

    code, out, err = central("cmd", "box-a", "pci-pause", "line=L1", "--json")
    assert code == 0, out
    from appliance.recorder.pci import read_pause_requests

    assert [r["paused"] for r in read_pause_requests(box.cfg.state_dir, "L1")] == [True]
    code, out, err = central("cmd", "box-a", "pci-resume", "line=L1")
    assert code == 0, out
    assert [r["paused"] for r in read_pause_requests(box.cfg.state_dir, "L1")] == [True, False]
    code, out, err = central("cmd", "box-a", "pci-pause")
    assert code == 1 and "needs args.line" in out

    logs = box.cfg.state_dir / "logs"
    logs.mkdir(parents=True)
    (logs / "uplink.log").write_text("".join(f"log line {i}\n" for i in range(500)))
    code, out, err = central("cmd", "box-a", "upload-logs", "lines=3", "--json")
    assert code == 0, out
    text = json.loads(out)["box-a"]["data"]["text"]
    assert text.splitlines()[-3:] == ["log line 497", "log line 498", "log line 499"]
    assert "log line 496" not in text


def test_cmd_names_the_boxes_that_did_not_answer(central: Callable[..., tuple[int, str, str]],
                                                 fleet: Fleet, box: Box, tmp_path: Path,
                                                 broker: Broker) -> None:
    from appliance.provision import make_request_document

    from .conftest import box_config, enrol

    cfg, _ = box_config(tmp_path / "silent", "box-silent")
    enrol(fleet, cfg, broker.port, tmp_path, site="lyon")  # enrolled, never started
    code, out, err = central("cmd", "all", "ping", "--timeout", "2")
    assert code == 1
    assert "box-a: ok" in out
    assert "box-silent: no answer within 2 s" in out
    assert "no answer from: box-silent" in err
    assert make_request_document  # the silent box really has keys and a certificate


UNITS = Path(__file__).resolve().parents[2] / "os-image" / "systemd"
SHIPPED_REQUESTS = "/var/lib/appliance/fleet/requests"


def run_unit(unit: str, requests: Path, systemctl: Path) -> None:
    """Run a shipped unit's ExecStartPre/ExecStart commands as systemd would (``$$`` is ``$``),
    against ``requests`` instead of the box's folder and with ``systemctl`` standing in."""
    for line in (UNITS / unit).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStartPre", "ExecStart"):
            value = value.replace("$$", "$").replace(SHIPPED_REQUESTS, str(requests))
            argv = [str(systemctl) if a == "/bin/systemctl" else a for a in shlex.split(value)]
            if argv[0] == "/bin/sh":
                argv[2] = argv[2].replace("/bin/systemctl", str(systemctl))
            subprocess.run(argv, check=True, timeout=30)


def test_restart_and_reboot_under_systemd_are_requests_the_path_units_act_on(
        central: Callable[..., tuple[int, str, str]], start_box: Callable[..., Box],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd cannot run here. The box's agent runs as under systemd (INVOCATION_ID set, as
    systemd sets it for its units) and writes its requests; then the shipped root units' own
    commands run against that folder, a stand-in ``systemctl`` recording what they would ask
    of systemd (a real one restarts appliance.target or reboots the machine)."""
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    box = start_box("box-a")
    _wait(lambda: box.uplink._link == "ready", "box online")
    requests = box.cfg.state_dir / "fleet" / "requests"
    calls = tmp_path / "systemctl.calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    systemctl.chmod(0o755)

    def called() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    code, out, _ = central("cmd", "box-a", "restart", "--json")
    assert code == 0, out
    data = json.loads(out)["box-a"]["data"]
    assert data["requested"] == "restart" and "appliance-restart.path" in data["by"]
    _wait(lambda: (requests / "restart").exists(), "the restart request")
    assert (requests / "restart").read_text() == boot_id() + "\n"
    run_unit("appliance-restart.service", requests, systemctl)
    assert called() == ["--no-block restart appliance.target"]
    assert not (requests / "restart").exists()  # acted on once

    code, out, _ = central("cmd", "box-a", "reboot")
    assert code == 0, out
    _wait(lambda: (requests / "reboot").exists(), "the reboot request")
    run_unit("appliance-reboot.service", requests, systemctl)
    assert called()[1:] == ["--no-block reboot"]
    assert not (requests / "reboot").exists()

    # A request of an earlier boot (left by a power cut): removed, never reboots again.
    (requests / "reboot").write_text("0f0f0f0f-earlier-boot\n")
    run_unit("appliance-reboot.service", requests, systemctl)
    assert len(called()) == 2 and not (requests / "reboot").exists()
    # A symlink planted in the folder is removed without following it.
    target = tmp_path / "elsewhere"
    target.write_text(boot_id() + "\n")
    (requests / "reboot").symlink_to(target)
    run_unit("appliance-reboot.service", requests, systemctl)
    assert len(called()) == 2 and not (requests / "reboot").is_symlink() and target.exists()

    # A pushed config asks for the capture and recorder units only.
    (requests / "restart-stages").write_text(boot_id() + "\n")
    run_unit("appliance-restart-stages.service", requests, systemctl)
    assert called()[2:] == ["--no-block restart appliance-recorder.service "
                            "appliance-capture@*.service"]


def test_the_request_units_verify(tmp_path: Path) -> None:
    names = [f"appliance-{a}.{k}" for a in ("restart", "restart-stages", "reboot")
             for k in ("path", "service")]
    for name in names:
        shutil.copy(UNITS / name, tmp_path / name)
    run = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          *[str(tmp_path / n) for n in names]],
                         capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


def test_restart_and_reboot_without_a_supervisor_say_so(
        central: Callable[..., tuple[int, str, str]], box: Box) -> None:
    for name in ("restart", "reboot"):
        code, out, _ = central("cmd", "box-a", name, "--json")
        assert code == 1
        res = json.loads(out)["box-a"]
        assert (res["result"], res["code"]) == ("failed", "not-available"), res
        assert "nothing supervises" in res["reason"]
    assert not (box.cfg.state_dir / "fleet" / "requests").exists()


def test_fleet_bad_usage_is_one_line_exit_2(central: Callable[..., tuple[int, str, str]],
                                            box: Box) -> None:
    cases = [
        (("cmd", "box-a", "ping", "oops"), "must be KEY=VALUE"),
        (("cmd", "planet:mars", "ping"), "expected a device id, site:NAME, tag:NAME or all"),
        (("cmd", "box-a", "ping", "--timeout", "0"), "--timeout 0"),
        (("cmd", "bad/id", "ping"), "device id 'bad/id' is invalid"),
        (("config", "box-a", "--set", "novalue"), "must be KEY=VALUE"),
        (("config", "box-a", "--set", "a..b=1"), "must be dotted words"),
        (("config", "tag:none", "--set", "fleet.telemetry_interval_s=5"), "names no box"),
        (("events", "--limit", "0"), "--limit 0"),
        (("revoke", "never-enrolled"), "is not enrolled"),
    ]
    for argv, expected in cases:
        code, out, err = central(*argv)
        assert code == 2, (argv, out, err)
        assert expected in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
