"""``appliance-central --home DIR <command>``: the tools central IT uses on the archive.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from central.fleet import cli as fleet_cli
from central.home import Home, init_home, open_home
from central.index import open_index, rebuild_index
from central.receiver import Receiver
from central.retention import start_retention
from central.search import CallFilter, find_calls
from central.store import Store, StoreError
from central.web import cli as web_cli
from linerec_contract.errors import ApplianceError, ConfigError, UsageError
from linerec_contract.segment import SealedSegment
from linerec_contract.verify import audit_chain

PROG = "appliance-central"


HOME_ENV = "APPLIANCE_CENTRAL_HOME"


class _SubParsers:
    """Subcommand parsers that also accept ``--home`` after the command name."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = self.action.add_parser(name, **kw)
        p.add_argument("--home", type=Path, default=argparse.SUPPRESS,
                       help=f"the central's state folder (default: ${HOME_ENV})")
        return p


def home_arg(args: argparse.Namespace) -> Path:
    if args.home is not None:
        return Path(args.home)
    env = os.environ.get(HOME_ENV)
    if not env:
        raise UsageError(f"no central home: give --home DIR or set {HOME_ENV}")
    return Path(env)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def cmd_init(args: argparse.Namespace) -> int:
    home = init_home(args.home)
    print("\n".join(home.recipients()))
    print(f"central home ready at {home.root}", file=sys.stderr)
    return 0


def cmd_enroll(home: Home, args: argparse.Namespace) -> int:
    home.require_writable()
    device = home.enroll(args.device, args.pubkey, replace=args.replace)
    print(f"enrolled {device.device_id} with key {device.key_id}")
    return 0


def cmd_serve(home: Home, args: argparse.Namespace) -> int:
    home.require_writable()
    cfg = home.config()
    values: dict[str, Any] = {
        "host": args.host or cfg.host,
        "port": args.port or cfg.port,
        "ca": args.ca or cfg.ca,
        "cert": args.cert or cfg.cert,
        "key": args.key or cfg.key,
    }
    for name, value in values.items():
        if value is None:
            raise ConfigError(
                f"broker {name} is not set: pass --{name} or set broker.{name} "
                f"in {home.config_path}"
            )
    for name in ("ca", "cert", "key"):
        if not Path(values[name]).is_file():
            raise ConfigError(f"broker {name} file {values[name]} does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    receiver = Receiver(
        home,
        host=values["host"],
        port=int(values["port"]),
        ca=Path(values["ca"]),
        cert=Path(values["cert"]),
        key=Path(values["key"]),
        group=args.group or cfg.group or home.share_group(),
        client_id=cfg.client_id,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start_retention(home, stop)  # the [retention] policy, applied every run_every_hours
    receiver.run(stop)
    return 0


def cmd_serve_https(home: Home, args: argparse.Namespace) -> int:
    from central.https import SegmentServer

    home.require_writable()
    if not args.external_proxy:
        for name in ("ca", "cert", "key"):
            value = getattr(args, name)
            if value is None:
                raise UsageError(f"--{name} is required (or --external-proxy)")
            if not value.is_file():
                raise ConfigError(f"--{name} file {value} does not exist (a PEM file)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is out of range (0..65535)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = SegmentServer(home, host=args.host, port=args.port, ca=args.ca, cert=args.cert,
                           key=args.key, external_proxy=args.external_proxy,
                           socket_path=args.socket)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start_retention(home, stop)  # the [retention] policy, applied every run_every_hours
    if args.external_proxy:
        ready = f"serving the intake on {server.socket_path} (behind your proxy)"
    else:
        ready = f"serving HTTPS on {args.host}:{server.port}"
    server.run(stop, on_ready=lambda: print(ready, file=sys.stderr, flush=True))
    return 0


def cmd_https_proxy_config(home: Home, args: argparse.Namespace) -> int:
    from central.https import RUN_DIR, SOCKET_NAME, https_limits, nginx_config

    print(nginx_config(listen=args.listen, ca=args.ca, cert=args.cert, key=args.key,
                       socket_path=args.socket or (home.root / RUN_DIR / SOCKET_NAME).resolve(),
                       limits=https_limits(home.config_path)), end="")
    return 0


def _time_ns(text: str, flag: str) -> int:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise UsageError(
            f"{flag} {text!r} is not an ISO date/time (e.g. 2024-05-01 or 2024-05-01T08:00Z)"
        ) from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1e9)


def call_filter(args: argparse.Namespace) -> CallFilter:
    """The ``calls`` filters given on the command line."""
    return CallFilter(
        device=args.device, line=args.line,
        since_ns=_time_ns(args.since, "--since") if args.since else None,
        until_ns=_time_ns(args.until, "--until") if args.until else None,
        caller=args.caller, digits=args.digits, direction=args.direction,
        min_duration_s=args.min_duration, max_duration_s=args.max_duration,
    )


def add_call_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="only this device")
    p.add_argument("--line", help="only this line")
    p.add_argument("--since", help="calls starting at or after (ISO date/time, UTC unless zoned)")
    p.add_argument("--until", help="calls starting before (ISO date/time, UTC unless zoned)")
    p.add_argument("--caller", help="caller ID contains these digits")
    p.add_argument("--digits", help="digits dialled on the call contain these")
    p.add_argument("--direction", help="inbound or outbound")
    p.add_argument("--min-duration", type=float, metavar="SECONDS")
    p.add_argument("--max-duration", type=float, metavar="SECONDS")


def cmd_calls(home: Home, args: argparse.Namespace) -> int:
    calls = find_calls(home, call_filter(args))
    if args.json:
        out = [dict(c.as_json(), start=_iso(c.start_ns), end=_iso(c.end_ns)) for c in calls]
        print(json.dumps(out, indent=1))
        return 0
    rows = [
        [
            c.device,
            c.line + (f" ({c.line_label})" if c.line_label else ""),
            c.call_id,
            _iso(c.start_ns),
            f"{c.duration_s:.1f}",
            "in" if c.direction == "inbound" else "out",
            c.caller_id or "-",
            c.dialled or (f"masked({c.masked_digits})" if c.masked_digits else "-"),
            str(len(c.parts)),
            ("yes" if c.complete else "NO") + (" " + ",".join(c.alarms) if c.alarms else ""),
        ]
        for c in calls
    ]
    print(_table(rows, ["DEVICE", "LINE", "CALL", "START", "SECONDS", "DIR", "CALLER",
                        "DIGITS", "PARTS", "COMPLETE"]))
    return 0


def cmd_segments(home: Home, args: argparse.Namespace) -> int:
    with open_index(home) as index:
        segs = index.segments(device=args.device)
    for s in segs:  # the index keeps file locations relative to the home; show usable paths
        for col in ("manifest_path", "payload_path"):
            if "://" not in s[col]:
                s[col] = str(home.root.resolve() / s[col])
    if args.json:
        print(json.dumps(segs, indent=1))
        return 0
    rows = [
        [
            s["device"],
            str(s["seq"]),
            s["line"],
            s["call_id"],
            str(s["part"]),
            str(s["frames"]),
            s["status"],
            s["manifest_path"],
            s["payload_path"],
        ]
        for s in segs
    ]
    header = ["DEVICE", "SEQ", "LINE", "CALL", "PART", "FRAMES", "STATUS", "MANIFEST", "PAYLOAD"]
    print(_table(rows, header))
    return 0


def cmd_export(home: Home, args: argparse.Namespace) -> int:
    from central.export import ExportFailed, export_call, export_many

    if args.all is not None:
        if args.call or args.out:
            raise UsageError("export: give either CALL --out FILE or --all DIR, not both")
        done, failed = export_many(home, args.all, call_filter(args), reason=args.reason,
                                   fmt=args.format, user=args.user)
        for result in done:
            print(f"OK {result.call.device} {result.call.call_id}: {result.audio_path} "
                  f"({result.frames} frames, sha256 {result.audio_sha256})")
        for line in failed:
            print(f"FAIL {line}")
        print(f"{len(done)} call(s) exported to {args.all}, {len(failed)} failed")
        return 1 if failed else 0
    if not args.call or args.out is None:
        raise UsageError("export: give CALL --out FILE.wav|FILE.flac, or --all DIR")
    try:
        result = export_call(home, args.call, args.out, reason=args.reason, device=args.device,
                             user=args.user)
    except ExportFailed as err:
        print(f"FAILED: {err}")
        return 1
    print(result.summary, end="")
    print(f"OK: wrote {result.audio_path}, {result.proof_path.name} and "
          f"{result.summary_path.name}")
    return 0


def cmd_check_export(args: argparse.Namespace) -> int:
    from central.export import check_export

    result = check_export(args.file, args.proof, central_key_id=args.central_key,
                          device_key=args.device_key)
    for note in result.notes:
        print(f"  {note}")
    for fail in result.failures:
        print(f"FAIL {fail}")
    print(f"{'OK' if result.ok else 'FAILED'}: {args.file}")
    return 0 if result.ok else 1


def cmd_access_log(home: Home, args: argparse.Namespace) -> int:
    from central import accesslog

    items = accesslog.entries(home)
    problems = accesslog.verify(home)
    if args.json:
        print(json.dumps({"entries": [vars(e) for e in items],
                          "intact": not problems,
                          "problems": [vars(p) for p in problems]}, indent=1))
    else:
        rows = [[str(e.n), e.at, e.user, e.action, e.device, e.call_id, e.reason]
                for e in items]
        print(_table(rows, ["N", "WHEN", "WHO", "WHAT", "DEVICE", "CALL", "WHY"]))
        for p in problems:
            print(f"FAIL line {p.line}: {p.detail}")
    return 1 if problems else 0


def _iso_arg(text: str | None, flag: str) -> int | None:
    return _time_ns(text, flag) if text else None


def cmd_hold(home: Home, args: argparse.Namespace) -> int:
    from central import holds

    if args.hold_command == "add":
        hold = holds.add_hold(home, reason=args.reason, call_id=args.call, device=args.device,
                              since_ns=_iso_arg(args.since, "--since"),
                              until_ns=_iso_arg(args.until, "--until"), user=args.user)
        print(f"hold {hold.hold_id} placed on {hold.describe()}")
        return 0
    if args.hold_command == "remove":
        hold = holds.remove_hold(home, args.hold_id, reason=args.reason, user=args.user)
        print(f"hold {hold.hold_id} on {hold.describe()} lifted")
        return 0
    items = holds.list_holds(home)
    if args.json:
        print(json.dumps([vars(h) for h in items], indent=1))
    else:
        print(_table([[h.hold_id, h.describe(), h.at, h.by, h.reason] for h in items],
                     ["HOLD", "COVERS", "SINCE", "BY", "REASON"]))
    return 0


def cmd_retention(home: Home, args: argparse.Namespace) -> int:
    from central.retention import parse_now, run_retention

    if not args.dry_run:
        home.require_writable()
    report = run_retention(home, parse_now(args.now), dry_run=args.dry_run)
    for d in report.decisions:
        if d.action in ("delete", "held", "locked"):
            verb = {"delete": "would delete" if args.dry_run else "deleted",
                    "held": "kept (legal hold)", "locked": "kept (locked)"}[d.action]
            extra = f": {d.detail}" if d.detail else ""
            print(f"{verb} {d.call.device} {d.call.call_id} ({len(d.call.parts)} segment(s), "
                  f"{d.policy}){extra}")
    for err in report.errors:
        print(f"FAIL {err}")
    print(f"retention at {_iso(report.now_ns)}: {report.count('delete')} call(s) "
          f"{'to delete' if args.dry_run else 'deleted'}, {report.count('held')} held, "
          f"{report.count('locked')} locked, {report.count('keep')} kept")
    return 1 if report.errors else 0


def cmd_report(home: Home, args: argparse.Namespace) -> int:
    from central.report import activity_report

    rows = activity_report(home, _iso_arg(args.since, "--since"), _iso_arg(args.until, "--until"),
                           device=args.device)
    if args.json:
        print(json.dumps([dict(vars(r), minutes=round(r.minutes, 2),
                               seconds=round(r.seconds, 3)) for r in rows], indent=1))
        return 0
    table = [[r.day, r.device, r.line + (f" ({r.line_label})" if r.line_label else ""),
              str(r.calls), f"{r.minutes:.1f}", str(r.inbound), str(r.outbound), str(r.gaps),
              str(r.alarms), str(r.incomplete)] for r in rows]
    print(_table(table, ["DAY", "DEVICE", "LINE", "CALLS", "MINUTES", "IN", "OUT", "GAPS",
                         "ALARMS", "INCOMPLETE"]))
    return 0


def cmd_verify(home: Home, args: argparse.Namespace) -> int:
    store = Store(home)
    devices = [args.device] if args.device else store.devices()
    from central.retention import deletion_audit

    issues: list[dict[str, Any]] = []
    notes: list[str] = []
    deletions = deletion_audit(home)
    from central.accesslog import verify as verify_access
    from central.holds import verify_holds

    for kind, problems in (("deletion-log", deletions.problems),
                           ("hold-log", verify_holds(home)),
                           ("access-log", verify_access(home))):
        issues.extend({"device": "-", "kind": kind, "seq": p.line,
                       "detail": f"{kind.replace('-', ' ')} line {p.line}: {p.detail}"}
                      for p in problems)
    devices = sorted(set(devices) | ({d for d, _ in deletions.deleted} if not args.device
                                     else set()))
    count = 0
    trust = home.trust()  # each device's own keys: a key never vouches for another device
    for dev in devices:
        if home.device(dev) is None:
            issues.append(
                {
                    "device": dev,
                    "kind": "unknown-device",
                    "seq": -1,
                    "detail": f"{dev} has stored segments but is not enrolled",
                }
            )
        segs = []
        for ref in store.iter_refs(dev):
            try:
                segs.append(store.load_ref(ref))
            except StoreError as err:
                issues.append(
                    {"device": dev, "kind": "unreadable", "seq": ref.seq, "detail": str(err)}
                )
        count += len(segs)
        issues.extend(
            _explain_deletions(dev, segs, audit_chain(segs, trust), deletions.deleted, notes)
        )
    with open_index(home) as index:
        index_issues = [i for i in index.check(store) if args.device in (None, i.device)]
    quarantined = len(store.quarantine_entries())
    ok = not issues
    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "devices": devices,
                    "segments": count,
                    "issues": issues,
                    "index_issues": [vars(i) for i in index_issues],
                    "quarantined": quarantined,
                    "deleted_by_policy": notes,
                },
                indent=1,
            )
        )
    else:
        for note in notes:
            print(f"DELETED {note}")
        for issue in issues:
            print(f"FAIL {issue['kind']}: {issue['detail']}")
        for ii in index_issues:
            print(f"WARN index {ii.kind}: {ii.device}/{ii.seq} {ii.detail} (run reindex)")
        if quarantined:
            print(f"NOTE {quarantined} quarantined message(s) in {home.quarantine_dir}")
        verdict = "OK" if ok else f"FAILED ({len(issues)} issue(s))"
        print(f"{verdict}: {count} segment(s) from {len(devices)} device(s) audited")
    return 0 if ok else 1


def _explain_deletions(dev: str, segs: list[SealedSegment], found: list[Any],
                       deleted: dict[tuple[str, int], dict[str, Any]], notes: list[str]
                       ) -> list[dict[str, Any]]:
    """Chain findings with the seqs retention deleted explained by their deletion-log entry:
    a gap made only of logged deletions is no issue; the segment after a deletion must still
    link to the deleted manifest's hash the log kept; a logged segment still present is one."""
    present = {s.seq: s for s in segs}
    mine = {seq: e for (d, seq), e in deleted.items() if d == dev}
    out = []
    for seq, e in sorted(mine.items()):
        notes.append(f"{dev}/{seq}: deleted by policy ({e['policy']}) at {e['deleted_at']}, "
                     f"deletion log entry {e['n']}, call {e['call_id']}")
        if seq in present:
            out.append({"device": dev, "kind": "not-deleted", "seq": seq,
                        "detail": f"{dev}/{seq} is logged as deleted (entry {e['n']}) but still "
                                  "stored: run retention again"})
        nxt = present.get(seq + 1)
        if nxt is not None and nxt.manifest["prev_manifest_sha256"] != e["manifest_sha256"]:
            out.append({"device": dev, "kind": "bad-link", "seq": seq + 1,
                        "detail": f"{dev}/{seq + 1} does not link to the manifest the deletion "
                                  f"log kept for seq {seq} (entry {e['n']})"})
    for issue in found:
        if issue.kind == "gap":
            after = [q for q in present if q > issue.seq]
            end = min(after) if after else issue.seq + 1
            if all(q in mine for q in range(issue.seq, end)):
                continue
        out.append({"device": dev, "kind": issue.kind, "seq": issue.seq, "detail": issue.detail})
    return out


def cmd_reindex(home: Home, args: argparse.Namespace) -> int:
    home.require_writable()
    count = rebuild_index(home)
    with open_index(home) as index:
        problems = index.check(Store(home))
    print(f"index rebuilt from the store: {count} segment(s)")
    for p in problems:
        print(f"WARN {p.kind}: {p.device}/{p.seq} {p.detail}")
    return 0 if not problems else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Archive, index and receiver of the line recorders.")
    parser.add_argument("--home", type=Path, help=f"the central's state folder (default: ${HOME_ENV})")
    sub = _SubParsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    sub.add_parser("init", help="create the home folder and the archive key; print the recipient")
    p = sub.add_parser("enroll", help="trust a device's Ed25519 public key")
    p.add_argument("device")
    p.add_argument("pubkey", help="base64 public key (appliance prints it)")
    p.add_argument("--replace", action="store_true", help="replace an enrolled key (old one kept)")
    p = sub.add_parser("serve", help="run the MQTT receiver")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--ca", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--group", help="shared-subscription group (default: the home's secret "
                   "group name, keys/share-group)")
    p = sub.add_parser("serve-https", help="run the HTTPS segment receiver (mutual TLS)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, required=True, help="TCP port (0 picks a free one)")
    p.add_argument("--ca", type=Path, help="CA that signs the boxes' certificates")
    p.add_argument("--cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--key", type=Path, help="server key (PEM)")
    p.add_argument("--external-proxy", action="store_true",
                   help="run only the intake on its Unix socket, behind an nginx you run "
                        "(see https-proxy-config)")
    p.add_argument("--socket", type=Path, help="the intake's Unix socket (default: "
                                               "HOME/run/https/intake.sock)")
    p = sub.add_parser("https-proxy-config",
                       help="print the nginx site that terminates mutual TLS for serve-https")
    p.add_argument("--listen", default="443", help="nginx listen address (default 443)")
    p.add_argument("--ca", type=Path, default=Path("/etc/appliance-central/fleet-ca.pem"))
    p.add_argument("--cert", type=Path, default=Path("/etc/appliance-central/server.pem"))
    p.add_argument("--key", type=Path, default=Path("/etc/appliance-central/server.key"))
    p.add_argument("--socket", type=Path)
    p = sub.add_parser("calls", help="find recorded calls (filters combine with AND)")
    add_call_filters(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("export", help="verify and write a call (or --all matching calls) with "
                       "its proof FILE.verification.json; logged in the access log")
    p.add_argument("call", nargs="?", help="call id")
    p.add_argument("--out", type=Path, help="FILE.wav or FILE.flac to write")
    p.add_argument("--all", type=Path, metavar="DIR",
                   help="export every call matching the filters into DIR")
    p.add_argument("--format", default="wav", help="wav or flac (with --all)")
    p.add_argument("--reason", required=True, help="why (kept in the access log)")
    p.add_argument("--user", help="who (default: the OS account)")
    add_call_filters(p)
    p = sub.add_parser("check-export", help="check an exported file against its "
                       "FILE.verification.json, offline (no home needed)")
    p.add_argument("file", type=Path)
    p.add_argument("--proof", type=Path, help="default: FILE.verification.json")
    p.add_argument("--central-key", help="require the proof to be signed by this key id")
    p.add_argument("--device-key", help="check the manifests with this public key (base64)")
    p = sub.add_parser("access-log", help="who exported or listened to which call, and why")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("segments", help="list stored segments with their files")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("verify", help="audit signatures and chains of the whole store")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    sub.add_parser("reindex", help="rebuild the index from the store")
    p = sub.add_parser("report", help="calls and minutes per device, line and day (UTC)")
    p.add_argument("--since", help="calls starting at or after (ISO)")
    p.add_argument("--until", help="calls starting before (ISO)")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("hold", help="legal holds: calls retention must keep")
    hold = p.add_subparsers(dest="hold_command", required=True, metavar="add|remove|ls")
    q = hold.add_parser("add", help="hold one call (--call) or a device's calls (--device)")
    q.add_argument("--call")
    q.add_argument("--device")
    q.add_argument("--since", help="with --device: calls starting at or after (ISO)")
    q.add_argument("--until", help="with --device: calls starting before (ISO)")
    q.add_argument("--reason", required=True)
    q.add_argument("--user")
    q = hold.add_parser("remove", help="lift a hold")
    q.add_argument("hold_id")
    q.add_argument("--reason", required=True, help="why the hold is lifted")
    q.add_argument("--user")
    q = hold.add_parser("ls", help="holds in force")
    q.add_argument("--json", action="store_true")
    p = sub.add_parser("retention", help="delete expired recordings (deletion log, holds)")
    ret = p.add_subparsers(dest="retention_command", required=True, metavar="run")
    q = ret.add_parser("run", help="apply the [retention] policy now (or at --now)")
    q.add_argument("--now", help="ISO time to apply the policy at (default: the clock)")
    q.add_argument("--dry-run", action="store_true", help="show, delete nothing")
    web_cli.add_parsers(sub)
    fleet_cli.add_parser(sub)
    return parser


COMMANDS = {
    "enroll": cmd_enroll,
    "serve": cmd_serve,
    "serve-https": cmd_serve_https,
    "https-proxy-config": cmd_https_proxy_config,
    "calls": cmd_calls,
    "segments": cmd_segments,
    "export": cmd_export,
    "access-log": cmd_access_log,
    "hold": cmd_hold,
    "report": cmd_report,
    "retention": cmd_retention,
    "verify": cmd_verify,
    "reindex": cmd_reindex,
    "fleet": fleet_cli.cmd_fleet,
    "web": web_cli.cmd_web,
    "users": web_cli.cmd_users,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "check-export":
            return cmd_check_export(args)
        args.home = home_arg(args)
        if args.command == "init":
            return cmd_init(args)
        return COMMANDS[args.command](open_home(args.home), args)
    except ApplianceError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"{PROG}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
