"""The fleet agent: telemetry, alarm events, signed commands and pushed config, on the uplink's
MQTT connection.

The uplink owns the connection; on every (re)connection it subscribes to the agent's topics
(``cmd/req`` and ``config/desired``) in the same SUBSCRIBE as its acks, hands the agent every
message on them (paho's thread only queues), and calls :meth:`FleetAgent.tick` from its own
loop, where all work happens: commands are verified by the one
:class:`~linerec_contract.fleet_protocol.CommandVerifier`, run, and answered on the MQTT v5
response topic with the request's correlation data; telemetry goes out every
``fleet.telemetry_interval_s``; alarms raised and cleared become events.

Commands (``docs/protocol.md``, "Fleet management"): ``ping``; ``selftest`` (the unattended
self-test, run beside the loop, answered when done, kept as the box's last result);
``restart`` and ``reboot`` (a request to the box's supervisor, :mod:`appliance.lifecycle`:
systemd's path units, or ``appliance run``, which restarts but cannot reboot; refused with the
reason where nothing supervises the box);
``set-config`` (the same path as a pushed config); ``rotate-keys`` (as ``appliance keys
rotate``); ``pci-pause`` / ``pci-resume`` on a line (a durable request the recorder applies,
see ``appliance.recorder.pci``); ``upload-logs`` (the last lines of the box's logs, bounded).

Liveness: the uplink declares its MQTT keep-alive in the box's status and sets
:attr:`FleetAgent.heartbeat_s` to a quarter of it; whenever nothing else went out for that long
the agent publishes a small heartbeat, so central can show a box that fell silent (frozen, link
cut without a FIN) offline within the keep-alive, without waiting for the broker's last will.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance import __version__, lifecycle, sdnotify
from appliance.config import Config
from appliance.sync.fleet_config import ConfigApplier, supervisor_restart, systemd_restart
from linerec_contract.durable import atomic_write_json, write_status
from linerec_contract.errors import ApplianceError, FormatError
from linerec_contract.fleet_protocol import (
    CommandRefused,
    CommandResult,
    CommandVerifier,
    DesiredConfig,
    NonceStore,
    cmd_req_topic,
    cmd_res_topic,
    config_desired_topic,
    config_reported_topic,
    heartbeat_topic,
)
from linerec_contract.protocol import MAX_CONTROL_MESSAGE, event_topic, telemetry_topic

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 48 * 1024
ALARM_SAMPLE_S = 2.0  # how often alarms are looked at, link up or not
MAX_PENDING_EVENTS = 500  # alarm events waiting for the link; beyond, the oldest are dropped
# Queued events go out at most this fast (bursts of EVENT_BURST), well inside the per-box budget
# of central's fleet service (5 messages a second, bursts of 50) with telemetry and heartbeats.
EVENT_RATE_PER_S = 2.0
EVENT_BURST = 20.0
MAX_INBOX = 64  # queued commands and configs; more are dropped (and counted) until drained
ANSWER_WAIT_S = 5.0


@dataclass
class _Inbound:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


def _systemd_unit() -> bool:
    """True when this process is a systemd unit (the box's supervisor is systemd)."""
    return bool(os.environ.get("INVOCATION_ID")) and shutil.which("systemctl") is not None


class FleetAgent:
    """One box's fleet agent (see the module docstring). Not thread-safe except on_message."""

    def __init__(self, cfg: Config, *, central_key: str | None, boot_id: str,
                 config_path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.device_id = cfg.device.id
        self.boot_id = boot_id
        self.clock = clock
        self.interval_s = cfg.fleet.telemetry_interval_s
        self.fleet_dir = cfg.state_dir / "fleet"
        self.fleet_dir.mkdir(parents=True, exist_ok=True)
        self.verifier = (CommandVerifier(self.device_id, central_key,
                                         NonceStore(self.fleet_dir / "nonces.json"), clock=clock)
                         if central_key else None)
        self.config = ConfigApplier(cfg, config_path=config_path)
        self.supervisor = lifecycle.supervisor()
        if self.supervisor is not None:
            from appliance.config import load_config

            hook = systemd_restart if self.supervisor == "systemd" else supervisor_restart
            self.config.restart = hook(lambda: load_config(config_path), boot_id, self._pulse)
        self._inbox: queue.SimpleQueue[_Inbound] = queue.SimpleQueue()
        self._queued = 0
        self._queue_lock = threading.Lock()
        self._next_telemetry = 0.0
        self.heartbeat_s: float | None = None  # set by the uplink from its keep-alive
        self._last_sent = 0.0  # monotonic time of the agent's last message on this connection
        self._client: mqtt.Client | None = None  # the connection of the tick running now
        # The alarms last observed, kept across restarts (an advisory file) so that an alarm
        # raised or cleared meanwhile still becomes an event. They are observed every
        # ALARM_SAMPLE_S whether the link is up or not; the events wait in a bounded, durable
        # queue until the broker has acknowledged them (PUBACK), so an alarm raised and cleared
        # while the box is offline still reaches central, in order, with the time it was seen.
        self._alarms_path = self.fleet_dir / "alarms.json"
        self._alarms: dict[str, dict[str, Any]] | None = self._load_alarms()
        self._next_observe = 0.0
        self._events_path = self.fleet_dir / "events-pending.json"
        self._events = self._load_events()
        self._events_client: mqtt.Client | None = None  # the connection _events_inflight is on
        self._events_inflight: dict[int, mqtt.MQTTMessageInfo] = {}
        self._event_tokens, self._event_tokens_at = EVENT_BURST, time.monotonic()
        self._after: list[Callable[[], None]] = []
        self._selftest: threading.Thread | None = None  # a remote self-test running
        self.started = time.monotonic()
        self.link_state: Callable[[], str] | None = None  # set by the uplink that carries us
        self._status_dirty = False  # the config version changed: the birth should say so
        self.counters = {"commands": 0, "refused": 0, "dropped": 0, "telemetry": 0, "events": 0,
                         "heartbeats": 0}

    # -- wiring with the uplink --------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [cmd_req_topic(self.device_id), config_desired_topic(self.device_id)]

    def handles(self, topic: str) -> bool:
        return topic in self.subscriptions()

    def config_version(self) -> int:
        return self.config.version

    def take_status_dirty(self) -> bool:
        """True once after the running config version changed (the uplink then publishes a
        fresh retained status)."""
        dirty, self._status_dirty = self._status_dirty, False
        return dirty

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: queue only (bounded)."""
        with self._queue_lock:
            if self._queued >= MAX_INBOX or len(msg.payload) > MAX_CONTROL_MESSAGE:
                self.counters["dropped"] += 1
                return
            self._queued += 1
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        self._inbox.put(_Inbound(msg.topic, bytes(msg.payload), response, corr))

    def on_connect(self) -> None:
        self._next_telemetry = 0.0  # a fresh telemetry right after every connection

    def _load_alarms(self) -> dict[str, dict[str, Any]] | None:
        try:
            obj = json.loads(self._alarms_path.read_text())
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def _load_events(self) -> dict[str, Any]:
        try:
            obj = json.loads(self._events_path.read_text())
        except (OSError, ValueError):
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("events"), list):
            return {"seq": 0, "dropped": 0, "events": []}
        return obj

    def _save_events(self) -> None:
        try:
            # Durability: an alarm event observed while offline survives a power cut until
            # central has it (one small fsynced file, written only when alarms change or
            # events are acknowledged).
            atomic_write_json(self._events_path, self._events)
        except OSError as err:
            log.warning("fleet: cannot keep %s: %s", self._events_path, err)

    def next_observe(self) -> float:
        """When :meth:`observe` has work next (the uplink wakes for it, link up or not)."""
        return self._next_observe

    def observe(self) -> None:
        """The uplink's loop, link up or not: look at the box's alarms every ALARM_SAMPLE_S
        and queue an event for each raised or cleared."""
        now = time.monotonic()
        if now < self._next_observe:
            return
        from appliance.status import collect

        st = collect(self.cfg)
        self._observe(self._current_alarms(st, st["stages"].get("recorder", {})), now)

    def next_deadline(self) -> float:
        due = [self._next_telemetry]
        if self.heartbeat_s is not None:
            due.append(self._last_sent + self.heartbeat_s)
        if len(self._events["events"]) > len(self._events_inflight):
            due.append(self._event_tokens_at + 1.0 / EVENT_RATE_PER_S)  # more events to send
        return min(due)

    def tick(self, client: mqtt.Client) -> None:
        """The uplink's loop: handle what arrived, publish telemetry and events when due."""
        self._client = client
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            with self._queue_lock:
                self._queued -= 1
            if item.topic == config_desired_topic(self.device_id):
                self._handle_desired(client, item.payload)
            else:
                self._handle_command(client, item)
        now = time.monotonic()
        if now >= self._next_telemetry:
            telemetry = self.telemetry()
            client.publish(telemetry_topic(self.device_id), json.dumps(telemetry).encode(), qos=0)
            self.counters["telemetry"] += 1
            self._observe(telemetry["alarms"], now)
            self._next_telemetry = now + self.interval_s
            self._last_sent = now
        else:
            self._heartbeat(client, now)
        self._flush_events(client)
        after, self._after = self._after, []
        for action in after:
            action()

    def _heartbeat(self, client: mqtt.Client, now: float) -> None:
        if self.heartbeat_s is not None and now >= self._last_sent + self.heartbeat_s:
            beat = {"v": 1, "ts": self.clock(), "boot_id": self.boot_id}
            client.publish(heartbeat_topic(self.device_id), json.dumps(beat).encode(), qos=0)
            self.counters["heartbeats"] += 1
            self._last_sent = now

    def _pulse(self) -> None:
        """Keep-alives while the uplink's loop waits for the stages to restart (a pushed
        config): the watchdog of the uplink's unit or supervisor, and central's heartbeat."""
        sdnotify.notifier().watchdog()
        if self._client is not None:
            self._heartbeat(self._client, time.monotonic())

    # -- commands ------------------------------------------------------------------------------

    def _handle_command(self, client: mqtt.Client, item: _Inbound) -> None:
        self.counters["commands"] += 1
        if self.verifier is None:
            result = CommandResult(device=self.device_id, name="?", nonce="", result="refused",
                                   code="unsigned", reason="this box has no central command key "
                                   "(install an enrolment bundle)", ts=self.clock())
        else:
            try:
                cmd = self.verifier.verify(item.payload)
            except CommandRefused as refused:
                self.counters["refused"] += 1
                cmd_ = refused.command
                log.warning("fleet: refused command %s: %s: %s",
                            cmd_.name if cmd_ else "?", refused.code, refused.reason)
                result = CommandResult(device=self.device_id, name=cmd_.name if cmd_ else "?",
                                       nonce=cmd_.nonce if cmd_ else "", result="refused",
                                       code=refused.code, reason=refused.reason, ts=self.clock())
            else:
                log.info("fleet: running command %s (%s)", cmd.name, cmd.nonce)
                if cmd.name == "selftest":
                    self._start_selftest(client, item, cmd.nonce)
                    return
                result = self._run(cmd.name, dict(cmd.args), cmd.nonce)
        self._answer(client, item, result)

    def _answer(self, client: mqtt.Client, item: _Inbound, result: CommandResult) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if item.correlation is not None:
            props.CorrelationData = item.correlation
        # A box may answer only on its own response topic (the broker's ACL says so too).
        info = client.publish(cmd_res_topic(self.device_id), result.encode(), qos=1,
                              properties=props)
        if self._after:
            # restart/reboot: let the answer reach the broker before the box goes down.
            try:
                info.wait_for_publish(ANSWER_WAIT_S)
            except (RuntimeError, ValueError) as err:
                log.warning("fleet: answer to %s not confirmed: %s", result.name, err)

    def _start_selftest(self, client: mqtt.Client, item: _Inbound, nonce: str) -> None:
        """Run the unattended self-test beside the uplink's loop (its line checks take seconds,
        the loop must keep sending segments and keep-alives) and answer when it is done; the
        result is kept as the box's last self-test (``appliance status``, telemetry)."""
        def answer(result: str = "ok", code: str = "", reason: str = "",
                   data: dict[str, Any] | None = None) -> None:
            # paho's publish may be called from any thread.
            self._answer(client, item, CommandResult(
                device=self.device_id, name="selftest", nonce=nonce,
                result=result,  # type: ignore[arg-type]
                code=code, reason=reason, data=data or {}, ts=self.clock()))

        if self._selftest is not None and self._selftest.is_alive():
            answer("failed", "busy", "a self-test is already running on this box")
            return

        def run() -> None:
            from appliance.selftest.runner import run_unattended
            from appliance.selftest.store import status_summary, status_summary_line

            try:
                run_unattended(self.cfg)
                summary = status_summary(self.cfg)
            except (ApplianceError, OSError) as err:
                log.error("fleet: remote self-test failed to run: %s", err)
                answer("failed", "error", f"the self-test did not run: {err}")
                return
            self._next_telemetry = 0.0  # central sees the new result with the next telemetry
            answer(data={"selftest": summary, "line": status_summary_line(summary)})

        self._selftest = threading.Thread(target=run, name="fleet-selftest", daemon=True)
        self._selftest.start()

    def _run(self, name: str, args: dict[str, Any], nonce: str) -> CommandResult:
        def done(result: str = "ok", code: str = "", reason: str = "",
                 data: dict[str, Any] | None = None) -> CommandResult:
            return CommandResult(device=self.device_id, name=name, nonce=nonce,
                                 result=result,  # type: ignore[arg-type]
                                 code=code, reason=reason, data=data or {}, ts=self.clock())

        try:
            if name == "ping":
                return done(data={"version": __version__, "boot_id": self.boot_id,
                                  "uptime_s": round(_uptime(), 1),
                                  "config_version": self.config.version})
            if name in ("restart", "reboot"):
                return self._lifecycle(name, done)
            if name == "set-config":
                text = args.get("overrides")
                if not isinstance(text, str):
                    return done("failed", "bad-args", "set-config needs args.overrides, a JSON "
                                "object of config keys")
                try:
                    overrides = json.loads(text)
                except ValueError as err:
                    return done("failed", "bad-args", f"args.overrides is not JSON: {err}")
                version = args.get("version")
                before = self.config.version
                report = self.config.apply(
                    overrides, version if isinstance(version, int) else self.config.version + 1)
                self._status_dirty = self._status_dirty or self.config.version != before
                return done("ok" if report.result in ("applied", "unchanged") else "failed",
                            "" if report.result in ("applied", "unchanged") else report.result,
                            report.reason, {"version": report.version, "result": report.result})
            if name == "rotate-keys":
                from appliance.recorder.service import NEXT_KEY_FILE
                from linerec_contract.identity import DeviceKey

                path = self.cfg.keys_dir / NEXT_KEY_FILE
                if path.exists():
                    key = DeviceKey.load(path)
                    return done(data={"key_id": key.key_id, "pending": True,
                                      "note": "a rotation was already pending"})
                key = DeviceKey.generate()
                key.save(path)
                return done(data={"key_id": key.key_id, "public_b64": key.public_b64,
                                  "note": "announced in the next sealed segment"})
            if name in ("pci-pause", "pci-resume"):
                from appliance.recorder.pci import request_pause

                line = args.get("line")
                known = self._line_ids()
                if not isinstance(line, str) or (known and line not in known):
                    return done("failed", "bad-args", f"{name} needs args.line, one of "
                                f"{', '.join(known) or 'the configured lines'}; got {line!r}")
                req = request_pause(self.cfg.state_dir, line, name == "pci-pause")
                return done(data={"line": line, "request": req})
            if name == "upload-logs":
                return done(data=self._recent_logs(args.get("lines")))
        except (ApplianceError, OSError) as err:
            return done("failed", "error", str(err))
        return done("failed", "unknown-command", f"unknown command {name!r}")

    def _lifecycle(self, name: str, done: Callable[..., CommandResult]) -> CommandResult:
        """restart / reboot: a request to the box's supervisor, written once the answer is on
        its way (the uplink goes down with the restart)."""
        if self.supervisor is None:
            return done("failed", "not-available", f"{name}: nothing supervises this box's "
                        "stages (neither systemd nor 'appliance run'); restart it where it runs")
        if name == "reboot" and self.supervisor == "run":
            return done("failed", "not-available", "reboot: this box runs under 'appliance "
                        "run', which restarts the stages but cannot reboot the machine; use "
                        "restart, or reboot it where it runs")
        action: lifecycle.Action = "restart" if name == "restart" else "reboot"
        by = {"systemd": f"systemd (appliance-{action}.path)",
              "run": "appliance run"}[self.supervisor]

        def act() -> None:
            path = lifecycle.request(self.cfg.state_dir, action, self.boot_id)
            log.warning("fleet: %s requested by central: %s asked of %s", name, path, by)

        self._after.append(act)  # after the answer has been handed to paho
        return done(data={"requested": action, "by": by,
                          "request": str(lifecycle.requests_dir(self.cfg.state_dir) / action)})

    def _line_ids(self) -> list[str]:
        ids: list[str] = []
        for cap in self.cfg.capture:
            ids += [m.line for m in cap.lines]
        try:
            rec = json.loads((self.cfg.run_dir / "recorder.json").read_text())
            ids += [str(ln["line"]) for ln in rec.get("lines", [])]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no recorder status yet (or not this version's): the configured lines only
        return sorted(set(ids))

    def _recent_logs(self, lines: object) -> dict[str, Any]:
        count = lines if isinstance(lines, int) and 1 <= lines <= 2000 else 200
        text = ""
        source = ""
        if _systemd_unit() and shutil.which("journalctl"):
            run = subprocess.run(["journalctl", "--no-pager", "-n", str(count), "-u",
                                  "appliance-*"], capture_output=True, text=True, check=False,
                                 timeout=30)
            text, source = run.stdout, "journalctl"
        else:
            logs = sorted((self.cfg.state_dir / "logs").glob("*.log"))
            parts = []
            for path in logs:
                try:
                    tail = path.read_bytes()[-MAX_LOG_BYTES:].decode("utf-8", "replace")
                except OSError:
                    continue
                parts.append(f"== {path.name}\n" + "\n".join(tail.splitlines()[-count:]))
            text, source = "\n".join(parts), str(self.cfg.state_dir / "logs")
        encoded = text.encode()[-MAX_LOG_BYTES:].decode("utf-8", "replace")
        return {"source": source, "bytes": len(encoded), "text": encoded,
                "truncated": len(text.encode()) > MAX_LOG_BYTES}

    # -- desired config ------------------------------------------------------------------------

    def _handle_desired(self, client: mqtt.Client, payload: bytes) -> None:
        try:
            desired = DesiredConfig.decode(payload)
        except FormatError as err:
            log.warning("fleet: ignored desired config: %s", err)
            return
        before = self.config.version
        report = self.config.apply(desired.overrides, desired.version)
        self._status_dirty = self._status_dirty or self.config.version != before
        client.publish(config_reported_topic(self.device_id), report.encode(), qos=1, retain=True)

    # -- telemetry and events ------------------------------------------------------------------

    def telemetry(self) -> dict[str, Any]:
        from appliance.status import collect

        st = collect(self.cfg)
        rec = st["stages"].get("recorder", {})
        lines = [{
            "line": ln.get("line"), "state": "in-call" if ln.get("in_call") else "idle",
            "paused": ln.get("paused", False), "level_db": ln.get("level_db"),
            "noise_floor_db": ln.get("noise_floor_db"),
            "alarms": sorted({a.get("kind") for a in rec.get("alarms", [])
                              if a.get("line") == ln.get("line")}),
        } for ln in (rec.get("lines", []) if rec.get("running") else [])]
        journal = []
        for name, data in st["stages"].items():
            if name.startswith("capture-"):
                stream = name.removeprefix("capture-")
                journal.append({"stream": stream, "running": data.get("running", False),
                                "state": data.get("state"), "xruns": data.get("xruns"),
                                "gaps": data.get("gaps"),
                                "recorder_caught_up": rec.get("caught_up"),
                                **self._journal_fill(stream, rec)})
        try:
            disk = shutil.disk_usage(self.cfg.state_dir)
            disk_info: dict[str, Any] = {"total_bytes": disk.total, "free_bytes": disk.free,
                                         "used_pct": round(100 * disk.used / disk.total, 1)}
        except OSError:
            disk_info = {}
        return {
            "v": 1, "ts": self.clock(), "device": self.device_id, "version": __version__,
            "boot_id": self.boot_id, "config_version": self.config.version,
            "uptime_s": round(_uptime(), 1), "lines": lines, "journal": journal,
            "outbox": st.get("backlog", {}),
            "link": self.link_state() if self.link_state else st.get("link"),
            "last_ack_ts": st.get("last_ack_ts"), "disk": disk_info,
            "temperature_c": _temperature(), "stages": {
                n: bool(d.get("running")) for n, d in st["stages"].items()},
            "alarms": self._current_alarms(st, rec), "last_selftest": self._last_selftest(),
            "interval_s": self.interval_s,
        }

    def _journal_fill(self, stream: str, rec: dict[str, Any]) -> dict[str, Any]:
        """How much of the ring the recorder has not read yet (``unread_pct``): near 100 the
        writer is about to overwrite audio the recorder has not taken."""
        from appliance.buffer.reader import RingReader

        cursor = (rec.get("cursors") or {}).get(stream)
        try:
            reader = RingReader(self.cfg.ring_path(stream))
        except (ApplianceError, OSError):
            return {}
        try:
            newest, slots = reader.newest_seq(), reader.header.slot_count
        except (ApplianceError, OSError):
            return {}
        finally:
            reader.close()
        if newest is None or not isinstance(cursor, int) or slots <= 0:
            return {"slots": slots, "newest_seq": newest}
        unread = max(0, newest + 1 - cursor)
        return {"slots": slots, "newest_seq": newest, "unread_records": unread,
                "unread_pct": round(100.0 * min(unread, slots) / slots, 1)}

    def _current_alarms(self, st: dict[str, Any], rec: dict[str, Any]) -> list[dict[str, Any]]:
        # Line alarms come from the recorder with their line; the rest with their source
        # (a stage), which tells one alarm from another of the same kind.
        out = [{"alarm": a.get("alarm"), "source": a.get("source"), "detail": a.get("detail")}
               for a in st.get("alarms", []) if not str(a.get("source", "")).startswith("line ")]
        out += [{"alarm": a.get("kind"), "line": a.get("line")} for a in rec.get("alarms", [])]
        out += [{"alarm": "stage-down", "stage": n} for n, d in st["stages"].items()
                if not d.get("running")]
        return out

    def _last_selftest(self) -> dict[str, Any] | None:
        from appliance.selftest.store import status_summary

        return status_summary(self.cfg)

    def _observe(self, alarms: list[dict[str, Any]], now: float) -> None:
        """Queue an event for every alarm raised or cleared since the last observation."""
        self._next_observe = now + ALARM_SAMPLE_S
        # An alarm is the same alarm while its kind and place are (its detail, e.g. "last
        # reported 20 s ago", changes from one look to the next).
        current = {json.dumps({k: v for k, v in a.items() if k != "detail"}, sort_keys=True): a
                   for a in alarms}
        if self._alarms is not None and current.keys() != self._alarms.keys():
            ts = self.clock()
            changes = [{"kind": "alarm-raised", **current[k]}
                       for k in sorted(current.keys() - self._alarms.keys())]
            changes += [{"kind": "alarm-cleared", **self._alarms[k]}
                        for k in sorted(self._alarms.keys() - current.keys())]
            for change in changes:
                self._events["seq"] += 1
                self._events["events"].append({"v": 1, "ts": ts, "seq": self._events["seq"],
                                               **change})
            over = len(self._events["events"]) - MAX_PENDING_EVENTS
            if over > 0:  # the oldest go; central is told how many
                del self._events["events"][:over]
                self._events["dropped"] += over
            self._save_events()
        if self._alarms is None or current.keys() != self._alarms.keys():
            try:
                write_status(self._alarms_path, current)
            except OSError as err:
                log.warning("fleet: cannot keep %s: %s", self._alarms_path, err)
        self._alarms = current

    def _flush_events(self, client: mqtt.Client) -> None:
        """Send the queued events (QoS 1) and forget those the broker acknowledged; a new
        connection sends again whatever was not acknowledged on the last one."""
        if client is not self._events_client:
            self._events_client, self._events_inflight = client, {}
        if self._events["dropped"]:
            self._events["seq"] += 1
            self._events["events"].insert(0, {
                "v": 1, "ts": self.clock(), "seq": self._events["seq"], "kind": "events-dropped",
                "count": self._events["dropped"]})
            self._events["dropped"] = 0
            self._save_events()
        now = time.monotonic()
        self._event_tokens = min(EVENT_BURST, self._event_tokens
                                 + (now - self._event_tokens_at) * EVENT_RATE_PER_S)
        self._event_tokens_at = now
        for event in self._events["events"]:
            if event["seq"] not in self._events_inflight:
                if self._event_tokens < 1.0:
                    break  # paced below central's per-box message budget; the rest follow
                self._event_tokens -= 1.0
                self._events_inflight[event["seq"]] = client.publish(
                    event_topic(self.device_id), json.dumps(event).encode(), qos=1)
                self.counters["events"] += 1
        # A publish refused at once (the link dropped between ticks, paho's queue full) is
        # forgotten here and sent again at the next tick; paho raises if asked about it.
        refused = {seq for seq, info in self._events_inflight.items()
                   if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN)}
        for seq in refused:
            del self._events_inflight[seq]
        done = {seq for seq, info in self._events_inflight.items() if info.is_published()}
        if done:
            self._events["events"] = [e for e in self._events["events"] if e["seq"] not in done]
            for seq in done:
                del self._events_inflight[seq]
            self._save_events()


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _temperature() -> float | None:
    """The highest thermal-zone temperature in °C, None where the kernel exposes none."""
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None
