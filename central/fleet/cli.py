"""``appliance-central fleet ...``: enrolment, status, telemetry, config and commands.

TARGET (``ls``, ``config``, ``cmd``) is a device id, ``site:NAME``, ``tag:NAME`` or ``all``
(every enrolled, non-revoked box). Tables for people, ``--json`` for scripts. Exit codes: 0 ok,
1 a box failed, refused or did not answer in time (named on stderr), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from central.fleet.link import (
    SERVE_CERT_S,
    SERVICE_CN,
    TOOL_CERT_S,
    broker_address,
    operator_cert,
    operator_tls,
)
from central.fleet.registry import Fleet
from central.fleet.store import FleetStore
from central.home import Home
from linerec_contract.durable import atomic_write_json
from linerec_contract.errors import UsageError
from linerec_contract.fleet_protocol import COMMANDS, DesiredConfig

STALE_FACTOR = 3  # telemetry older than 3 of the box's intervals is shown as stale


def add_parser(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="enrol boxes; their status, telemetry, config, commands")
    fs = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND",
                              parser_class=type(fleet))
    p = fs.add_parser("enroll", help="sign a box's enrolment request and write its bundle")
    p.add_argument("request", type=Path, help="the request 'appliance provision' wrote")
    p.add_argument("--out", type=Path, required=True, help="bundle file to write")
    p.add_argument("--broker", help="HOST:PORT the box connects to (default: central.toml)")
    p.add_argument("--site", default="")
    p.add_argument("--tag", action="append", default=[])
    p.add_argument("--replace", action="store_true", help="re-enrol with a new key")
    p = fs.add_parser("revoke", help="put a box's certificates on the broker's CRL")
    p.add_argument("device")
    p = fs.add_parser("broker-config", help="write the shipped broker configuration for this fleet")
    p.add_argument("--out", type=Path, required=True, help="folder for mosquitto.conf and its files")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address mosquitto binds")
    p.add_argument("--name", action="append", default=[],
                   help="host name or address the boxes connect to (repeatable)")
    p.add_argument("--user", default="mosquitto",
                   help="account mosquitto runs as; it must read the files in --out")
    p = fs.add_parser("serve", help="record every box's status, telemetry, events and answers")
    p.add_argument("--broker")
    p = fs.add_parser("ls", help="every box: online, telemetry, backlog, alarms")
    p.add_argument("target", nargs="?", default="all")
    p.add_argument("--json", action="store_true")
    p = fs.add_parser("show", help="one box in detail")
    p.add_argument("device")
    p.add_argument("--json", action="store_true")
    p = fs.add_parser("config", help="desired and reported config; --set pushes keys")
    p.add_argument("target")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted key and TOML value, e.g. recorder.threshold_db=15")
    p.add_argument("--unset", action="append", default=[], metavar="KEY")
    p.add_argument("--broker")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    p = fs.add_parser("cmd", help="send a signed command and wait for the answers")
    p.add_argument("target")
    p.add_argument("name", choices=COMMANDS)
    p.add_argument("args", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--broker")
    p.add_argument("--timeout", type=float, default=15.0)
    p.add_argument("--json", action="store_true")
    p = fs.add_parser("events", help="alarms raised and cleared, and other box events")
    p.add_argument("--device")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")


def _store(home: Home) -> FleetStore:
    return FleetStore(home.root / "fleet" / "fleet.sqlite")


def _targets(fleet: Fleet, store: FleetStore, target: str) -> list[str]:
    kind, sep, name = target.partition(":")
    if target == "all":
        known = {b.device_id for b in fleet.boxes() if b.revoked_at is None}
        return sorted(known | set(store.statuses()))
    if sep and kind == "site":
        return fleet.select([], site=name)
    if sep and kind == "tag":
        return fleet.select([], tag=name)
    if sep:
        raise UsageError(f"target {target!r}: expected a device id, site:NAME, tag:NAME or all")
    return fleet.select([target])


def _age(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    age = max(0.0, now - ts)
    return f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.0f}h"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def _summary(dev: str, fleet: Fleet, store: FleetStore, now: float) -> dict[str, Any]:
    status = store.status(dev) or {}
    tel = store.telemetry(dev) or {}
    box = fleet.box(dev)
    interval = tel.get("interval_s")
    interval = float(interval) if isinstance(interval, int | float) and interval > 0 else 60.0
    fresh_s = STALE_FACTOR * interval
    received = tel.get("received_at")
    outbox = tel.get("outbox") or {}
    conf = store.config(dev)
    reported = conf.get("reported") or {}
    return {
        "device": dev, "site": box.site if box else "", "tags": box.tags if box else [],
        "revoked": bool(box and box.revoked_at),
        "state": status.get("state", "never seen"), "version": status.get("version"),
        "boot_id": status.get("boot_id"), "session": status.get("session"),
        "status_ts": status.get("received_at"),
        "keepalive_s": status.get("keepalive_s"),
        "last_seen_age_s": None if status.get("last_seen") is None
        else round(now - status["last_seen"], 1),
        "offline_at": status.get("offline_at"), "offline_reason": status.get("offline_reason"),
        "config_version": status.get("config_version"),
        "desired_version": conf.get("desired_version"),
        "reported": reported,
        "telemetry_age_s": None if received is None else round(now - received, 1),
        "telemetry_fresh": received is not None and now - received <= fresh_s
        and status.get("state") == "online",
        "lines": len(tel.get("lines", [])), "link": tel.get("link"),
        "backlog_segments": outbox.get("segments"), "oldest_age_s": outbox.get("oldest_age_s"),
        "alarms": [a.get("alarm") for a in tel.get("alarms", [])],
    }


def cmd_fleet(home: Home, args: argparse.Namespace) -> int:
    fleet = Fleet(home)
    handler = {"enroll": _enroll, "revoke": _revoke, "broker-config": _broker_config,
               "serve": _serve, "ls": _ls, "show": _show,
               "config": _config, "cmd": _cmd, "events": _events}[args.fleet_command]
    return handler(fleet, args)


def _enroll(fleet: Fleet, args: argparse.Namespace) -> int:
    fleet.home.require_writable()
    address = broker_address(fleet, args.broker)
    bundle = fleet.enroll(args.request, host=address.host, port=address.port, site=args.site,
                          tags=args.tag, replace=args.replace)
    atomic_write_json(args.out, bundle, mode=0o600)
    print(f"enrolled {bundle['device_id']}: bundle written to {args.out}; install it on the box "
          f"with: appliance provision --install {args.out.name}")
    return 0


def _revoke(fleet: Fleet, args: argparse.Namespace) -> int:
    record = fleet.revoke(args.device)
    print(f"revoked {record.device_id}: {len(record.serials)} certificate(s) on {fleet.pki.crl}; "
          f"the broker refuses them once it re-reads the CRL (SIGHUP or restart)")
    return 0


def _broker_config(fleet: Fleet, args: argparse.Namespace) -> int:
    """The shipped configuration (linerec_contract/broker_conf) for a real broker of this fleet."""
    import shutil

    from central.fleet.link import parse_address
    from central.home import make_dirs
    from linerec_contract.broker_config import plugin_path, render_acl, render_config
    from linerec_contract.durable import atomic_write
    from linerec_contract.pki import issue_server

    listen = parse_address(args.listen)
    names = args.name or [listen.host]
    pki = fleet.ensure()
    out: Path = args.out.resolve()
    make_dirs(out / "data")
    issue_server(pki, names, out / "server.crt", out / "server.key")
    plugin = out / "fleet_acl.so"
    shutil.copyfile(plugin_path(), plugin)
    users = ("central", "central-*")
    atomic_write(out / "mosquitto.acl", render_acl(users).encode())
    conf = render_config(port=listen.port, host=listen.host, ca=pki.ca_cert,
                         cert=out / "server.crt", key=out / "server.key", crl=pki.crl,
                         acl=out / "mosquitto.acl", plugin=plugin, central_users=users)
    conf += (f"\npersistence true\npersistence_location {out / 'data'}/\n"
             f"autosave_interval 60\nlog_dest syslog\nlog_dest stderr\nuser {args.user}\n")
    atomic_write(out / "mosquitto.conf", conf.encode())
    print(f"broker configuration for {', '.join(names)} written to {out}: run "
          f"'mosquitto -c {out / 'mosquitto.conf'}'; after 'fleet revoke', send it SIGHUP")
    return 0


def _serve(fleet: Fleet, args: argparse.Namespace) -> int:
    import logging

    from central.fleet.service import FleetService

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    address = broker_address(fleet, args.broker)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # One fleet service per central: a fixed name, so its broker session (and the box events
    # queued in it while the service was down) outlives a restart of the service.
    with _store(fleet.home) as store, \
            operator_cert(fleet, "fleet", SERVE_CERT_S, cn=SERVICE_CN) as cert:
        FleetService(store, address, cert.context, cert=cert).run(stop)
    return 0


def _ls(fleet: Fleet, args: argparse.Namespace) -> int:
    now = time.time()
    with _store(fleet.home) as store:
        rows = [_summary(dev, fleet, store, now) for dev in _targets(fleet, store, args.target)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [[r["device"], r["site"] or "-", "REVOKED" if r["revoked"] else
              f"{r['state']} ({r['offline_reason']})" if r["offline_reason"] else r["state"],
              r["version"] or "-", f"{r['config_version'] or 0}/{r['desired_version'] or 0}",
              _age(now - r["telemetry_age_s"], now) if r["telemetry_age_s"] is not None else "-",
              str(r["lines"]), r["link"] or "-", str(r["backlog_segments"] or 0),
              ",".join(a for a in r["alarms"] if a) or "-"] for r in rows]
    print(_table(table, ["DEVICE", "SITE", "STATE", "VERSION", "CONFIG", "TELEMETRY", "LINES",
                         "LINK", "BACKLOG", "ALARMS"]))
    online = sum(r["state"] == "online" for r in rows)
    print(f"{len(rows)} box(es): {online} online, {len(rows) - online} not online")
    return 0


def _show(fleet: Fleet, args: argparse.Namespace) -> int:
    now = time.time()
    with _store(fleet.home) as store:
        dev = fleet.select([args.device])[0]
        out: dict[str, Any] = {
            "summary": _summary(dev, fleet, store, now), "status": store.status(dev),
            "telemetry": store.telemetry(dev), "config": store.config(dev),
            "events": store.events(dev, limit=20)}
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    s = out["summary"]
    print(f"device {dev}  site {s['site'] or '-'}  tags {','.join(s['tags']) or '-'}")
    print(f"  state {s['state']}  version {s['version']}  boot {s['boot_id']}  session "
          f"{s['session']}  config {s['config_version']} (desired {s['desired_version']})")
    if s["offline_reason"]:
        why = "its last will" if s["offline_reason"] == "will" else \
            f"silence (nothing for half its {s['keepalive_s']} s keep-alive)"
        print(f"  offline since {_iso(s['offline_at'])} by {why}")
    tel = out["telemetry"] or {}
    print(f"  telemetry {_age(tel.get('received_at'), now)} ago  uptime {tel.get('uptime_s')} s  "
          f"link {tel.get('link')}  temperature {tel.get('temperature_c')}")
    ob = tel.get("outbox") or {}
    print(f"  outbox {ob.get('segments', 0)} segment(s), oldest {ob.get('oldest_age_s') or 0:.0f} s"
          f"  disk {tel.get('disk', {}).get('used_pct', '-')} % used")
    for ln in tel.get("lines", []):
        print(f"  line {ln['line']:<8} {ln['state']:<8} level {ln.get('level_db')} dBFS  floor "
              f"{ln.get('noise_floor_db')} dBFS  alarms {','.join(ln.get('alarms') or []) or '-'}")
    for alarm in tel.get("alarms", []):
        print(f"  ALARM {json.dumps(alarm, sort_keys=True)}")
    hidden = ("v", "ts", "kind", "device", "received_at")
    for ev in out["events"]:
        detail = {k: v for k, v in ev.items() if k not in hidden}
        print(f"  event {_iso(ev.get('ts'))} {ev['kind']} {json.dumps(detail)}")
    return 0


def _iso(ts: float | None) -> str:
    return "-" if not ts else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def _set_key(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise UsageError(f"key {dotted!r} must be dotted words, e.g. recorder.threshold_db")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"key {dotted!r}: {part} is a value, not a table")
        node = child
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _config(fleet: Fleet, args: argparse.Namespace) -> int:
    from central.fleet.commands import publish_desired

    if not 0.1 <= args.timeout <= 3600:
        raise UsageError(f"--timeout {args.timeout} is out of range (0.1..3600 s)")
    with _store(fleet.home) as store:
        targets = _targets(fleet, store, args.target)
        if not targets:
            raise UsageError(f"target {args.target!r} names no box")
        if args.set or args.unset:
            pushed: dict[str, DesiredConfig] = {}
            for dev in targets:
                overrides = json.loads(json.dumps(store.config(dev)["desired"]))
                for item in args.set:
                    key, sep, value = item.partition("=")
                    if not sep:
                        raise UsageError(f"--set {item!r} must be KEY=VALUE")
                    _set_key(overrides, key.strip(), _parse_value(value.strip()))
                for key in args.unset:
                    _set_key(overrides, key.strip(), None)
                version = store.set_desired(dev, overrides)
                pushed[dev] = DesiredConfig(version=version, overrides=overrides, ts=time.time())
            with operator_tls(fleet, "cli", args.timeout + TOOL_CERT_S) as tls:
                reports = publish_desired(broker_address(fleet, args.broker), tls, pushed,
                                          wait_s=args.timeout)
            for dev, rep in reports.items():
                if rep is not None:
                    store.record_reported(dev, rep)
        rows = {dev: store.config(dev) for dev in targets}
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        for dev, conf in rows.items():
            rep = conf.get("reported") or {}
            print(f"{dev}: desired v{conf['desired_version']} {json.dumps(conf['desired'])}; "
                  f"reported v{rep.get('version', '-')} {rep.get('result', 'nothing yet')}"
                  + (f" ({rep['reason']})" if rep.get("reason") else ""))
    if args.set or args.unset:
        bad = [d for d, c in rows.items() if (c.get("reported") or {}).get("desired_version")
               != c["desired_version"] or (c.get("reported") or {}).get("result") != "applied"]
        if bad:
            print(f"not applied (yet) on: {', '.join(bad)}", file=sys.stderr)
            return 1
    return 0


def _cmd(fleet: Fleet, args: argparse.Namespace) -> int:
    from central.fleet.commands import send_commands

    cmd_args: dict[str, str | int | bool] = {}
    for item in args.args:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"command argument {item!r} must be KEY=VALUE")
        parsed = _parse_value(value)
        cmd_args[key] = parsed if isinstance(parsed, str | int | bool) else value
    if not 0.1 <= args.timeout <= 3600:
        raise UsageError(f"--timeout {args.timeout} is out of range (0.1..3600 s)")
    with _store(fleet.home) as store:
        targets = _targets(fleet, store, args.target)
        if not targets:
            raise UsageError(f"target {args.target!r} names no box")
        with operator_tls(fleet, "cli", args.timeout + TOOL_CERT_S) as tls:
            answers = send_commands(broker_address(fleet, args.broker), tls, fleet.command_key(),
                                    store, targets, args.name, cmd_args, timeout_s=args.timeout)
    silent = [d for d, r in answers.items() if r is None]
    failed = [d for d, r in answers.items() if r is not None and r.result != "ok"]
    if args.json:
        print(json.dumps({d: (None if r is None else r.__dict__) for d, r in answers.items()},
                         indent=1, default=str))
    else:
        for dev, r in answers.items():
            if r is None:
                print(f"{dev}: no answer within {args.timeout:g} s")
            elif r.result == "ok":
                print(f"{dev}: ok {json.dumps(r.data, sort_keys=True)[:400]}")
            else:
                print(f"{dev}: {r.result} ({r.code}) {r.reason}")
    if silent:
        print(f"no answer from: {', '.join(silent)}", file=sys.stderr)
    return 1 if silent or failed else 0


def _events(fleet: Fleet, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100000:
        raise UsageError(f"--limit {args.limit} is out of range (1..100000)")
    with _store(fleet.home) as store:
        events = store.events(fleet.select([args.device])[0] if args.device else None,
                              limit=args.limit)
    if args.json:
        print(json.dumps(events, indent=1))
        return 0
    rows = [[_iso(e.get("ts")), e["device"], e["kind"],
             json.dumps({k: v for k, v in e.items()
                         if k not in ("v", "ts", "kind", "device", "received_at")})[:100]]
            for e in events]
    print(_table(rows, ["TIME", "DEVICE", "EVENT", "DETAIL"]))
    return 0
