"""Signed commands and pushed config, from central to boxes (MQTT v5 request/response).

Every command is signed with central's command key for one box, published on that box's
``cmd/req`` with a response topic (its ``cmd/res``) and the nonce as correlation data. The tool
waits for every answer up to a timeout and names the boxes that did not answer.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import asdict
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from central.fleet.link import BrokerAddress
from central.fleet.store import FleetStore
from linerec_contract.errors import ApplianceError, FormatError
from linerec_contract.fleet_protocol import (
    Command,
    CommandResult,
    DesiredConfig,
    ReportedConfig,
    cmd_req_topic,
    cmd_res_topic,
    config_desired_topic,
    config_reported_topic,
    sign_command,
)
from linerec_contract.identity import DeviceKey

CONNECT_TIMEOUT_S = 15.0


class FleetLinkError(ApplianceError):
    """The broker could not be reached or refused the fleet tool."""

    exit_code = 1


class _Session:
    """One short MQTT connection of a fleet tool."""

    def __init__(self, address: BrokerAddress, tls: ssl.SSLContext) -> None:
        self.address = address
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
        self.client.tls_set_context(tls)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.error = ""
        self.results: dict[str, CommandResult] = {}
        self.lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            self.error = str(rc)
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            result = CommandResult.decode(bytes(msg.payload))
        except FormatError:
            return
        corr = getattr(msg.properties, "CorrelationData", None)
        nonce = corr.decode("ascii", "replace") if isinstance(corr, bytes) else result.nonce
        if msg.topic != cmd_res_topic(result.device):
            return
        with self.lock:
            self.results[nonce] = result

    def __enter__(self) -> _Session:
        try:
            self.client.connect(self.address.host, self.address.port, keepalive=30)
        except (OSError, ssl.SSLError) as err:
            raise FleetLinkError(f"cannot reach the broker at {self.address.host}:"
                                 f"{self.address.port}: {err}") from err
        self.client.loop_start()
        if not self.connected.wait(CONNECT_TIMEOUT_S) or self.error:
            self.client.loop_stop()
            raise FleetLinkError(f"the broker at {self.address.host}:{self.address.port} did not "
                                 f"accept the fleet tool: {self.error or 'no answer'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def send_commands(address: BrokerAddress, tls: ssl.SSLContext, key: DeviceKey, store: FleetStore,
                  targets: list[str], name: str, args: dict[str, str | int | bool], *,
                  timeout_s: float, ttl_s: float | None = None) -> dict[str, CommandResult | None]:
    """Send ``name`` to every target and wait; None for a box that did not answer in time."""
    commands: dict[str, Command] = {
        dev: sign_command(key, name=name, device=dev, args=args,
                          ttl_s=ttl_s or max(30.0, timeout_s + 5)) for dev in targets}
    with _Session(address, tls) as session:
        session.client.subscribe([(cmd_res_topic(dev), 1) for dev in targets])
        if not session.subscribed.wait(CONNECT_TIMEOUT_S):
            raise FleetLinkError("the broker did not confirm the subscription to the answers")
        for dev, cmd in commands.items():
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = cmd_res_topic(dev)
            props.CorrelationData = cmd.nonce.encode()
            session.client.publish(cmd_req_topic(dev), cmd.encode(), qos=1, properties=props)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with session.lock:
                if all(c.nonce in session.results for c in commands.values()):
                    break
            time.sleep(0.05)
        with session.lock:
            answers = {dev: session.results.get(cmd.nonce) for dev, cmd in commands.items()}
    for dev, result in answers.items():
        if result is not None:
            store.record_result(dev, asdict(result))
    return answers


def publish_desired(address: BrokerAddress, tls: ssl.SSLContext,
                    desired: dict[str, DesiredConfig], *,
                    wait_s: float) -> dict[str, dict[str, Any] | None]:
    """Publish each box's desired config (retained) and wait up to ``wait_s`` for each box's
    report on that version; None for a box that did not report it in time."""
    reports: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def on_report(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        dev = msg.topic.split("/")[2]
        try:
            rep = ReportedConfig.decode(bytes(msg.payload))
        except FormatError:
            return
        if dev in desired and rep.desired_version == desired[dev].version:
            with lock:
                reports[dev] = asdict(rep)

    with _Session(address, tls) as session:
        session.client.on_message = on_report
        session.client.subscribe([(config_reported_topic(dev), 1) for dev in desired])
        if not session.subscribed.wait(CONNECT_TIMEOUT_S):
            raise FleetLinkError("the broker did not confirm the subscription to the reports")
        infos = [session.client.publish(config_desired_topic(dev), d.encode(), qos=1, retain=True)
                 for dev, d in desired.items()]
        for info in infos:
            try:
                info.wait_for_publish(CONNECT_TIMEOUT_S)
            except (RuntimeError, ValueError) as err:  # paho: the link dropped, queue full
                raise FleetLinkError(f"the desired config was not published: {err}") from err
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with lock:
                if len(reports) == len(desired):
                    break
            time.sleep(0.05)
    with lock:
        return {dev: reports.get(dev) for dev in desired}
