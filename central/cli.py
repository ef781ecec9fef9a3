"""``appliance-central --home DIR <command>``: the tools central IT uses on the archive.

Exit codes: 0 ok, 1 a check failed, 2 bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import soundfile as sf

from central.home import Home, init_home, open_home
from central.index import open_index, rebuild_index
from central.receiver import Receiver
from central.search import CallFilter, find_calls
from central.store import Store, StoreError
from central.web import cli as web_cli
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ApplianceError, ConfigError, FormatError, UsageError, VerificationError
from linerec_contract.segment import SealedSegment
from linerec_contract.verify import audit_chain, open_segment_audio, verify_trusted

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


def _call_rows(home: Home, call_id: str, device: str | None) -> list[dict[str, Any]]:
    with open_index(home) as index:
        rows = index.call_segments(call_id, device)
    if not rows:
        where = f" on device {device}" if device else ""
        raise UsageError(
            f"no call {call_id!r}{where} in the index (list them with: calls; "
            "after changes to the store run: reindex)"
        )
    places = sorted({(r["device"], r["line"]) for r in rows})
    if len(places) > 1:
        names = ", ".join(f"{d} line {ln}" for d, ln in places)
        raise UsageError(f"call id {call_id!r} exists on {names}; choose one with --device")
    return rows


def _check_out(out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in .wav")
    if not folder.is_dir():
        raise UsageError(f"--out {out}: folder {folder} does not exist")
    probe = folder / f".{out.name}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {folder}: {err.strerror}") from err


def _check_part(
    home: Home, seg: SealedSegment, expect_part: int, prev: SealedSegment | None, identity: str
) -> tuple[list[str], np.ndarray | None]:
    """Failures for one part, and its PCM when it decrypted."""
    m, fails = seg.manifest, []
    device = home.device(seg.device_id)
    if device is None:
        fails.append(f"device {seg.device_id} is not enrolled: no key may sign its segments")
    else:
        try:
            verify_trusted(seg, device.trust())
        except (VerificationError, FormatError) as err:
            fails.append(f"signature/hash: {err}")
    if m["part"] != expect_part:
        fails.append(f"part number {m['part']}, expected {expect_part}")
    if prev is not None:
        want = prev.manifest["start_frame"] + prev.manifest["frames"]
        if m["start_frame"] != want:
            fails.append(f"starts at frame {m['start_frame']}, previous part ends at {want}")
        if m["sample_rate"] != prev.manifest["sample_rate"]:
            fails.append(f"rate {m['sample_rate']} differs from part 0")
    pcm = None
    try:
        pcm, _rate = open_segment_audio(seg, identity)
        if pcm.size != m["frames"]:
            fails.append(f"decoded {pcm.size} frames, manifest says {m['frames']}")
    except (VerificationError, FormatError) as err:
        fails.append(f"decrypt/decode: {err}")
    return fails, pcm


def cmd_export(home: Home, args: argparse.Namespace) -> int:
    rows = _call_rows(home, args.call, args.device)
    _check_out(args.out)
    store, identity = Store(home), home.identity()
    first = rows[0]
    print(f"call {args.call} on {first['device']} line {first['line']}: {len(rows)} part(s)")
    failed, pcms, prev = False, [], None
    for number, row in enumerate(rows):
        try:
            seg = store.load(row["device"], row["seq"])
        except StoreError as err:
            print(f"  part {number} seq {row['seq']}: FAIL {err}")
            failed = True
            continue
        fails, pcm = _check_part(home, seg, number, prev, identity)
        if number == len(rows) - 1 and not seg.manifest["last_part"]:
            fails.append("the call's last part is missing (no part has last_part set)")
        if number < len(rows) - 1 and seg.manifest["last_part"]:
            fails.append("marked last_part but more parts follow")
        gaps = seg.manifest["gaps"]
        verdict = "FAIL " + "; ".join(fails) if fails else "ok (signature, sha256, join)"
        gap_note = f", {len(gaps)} recorded gap(s)" if gaps else ""
        print(f"  part {number} seq {seg.seq} frames {seg.manifest['frames']}{gap_note}: {verdict}")
        failed = failed or bool(fails)
        if pcm is not None:
            pcms.append(pcm)
        prev = seg
    if failed or prev is None:
        print(f"FAILED: {args.out} not written")
        return 1
    audio = np.concatenate(pcms).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, audio, int(prev.manifest["sample_rate"]), format="WAV", subtype="PCM_16")
    # atomic_write fsyncs: an export reported as written is whole on disk.
    atomic_write(args.out, buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    seconds = audio.size / prev.manifest["sample_rate"]
    print(f"OK: wrote {args.out} ({audio.size} frames, {seconds:.2f} s, sha256 {digest})")
    return 0


def cmd_verify(home: Home, args: argparse.Namespace) -> int:
    store = Store(home)
    devices = [args.device] if args.device else store.devices()
    issues: list[dict[str, Any]] = []
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
            {"device": dev, "kind": i.kind, "seq": i.seq, "detail": i.detail}
            for i in audit_chain(segs, trust)
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
                },
                indent=1,
            )
        )
    else:
        for issue in issues:
            print(f"FAIL {issue['kind']}: {issue['detail']}")
        for ii in index_issues:
            print(f"WARN index {ii.kind}: {ii.device}/{ii.seq} {ii.detail} (run reindex)")
        if quarantined:
            print(f"NOTE {quarantined} quarantined message(s) in {home.quarantine_dir}")
        verdict = "OK" if ok else f"FAILED ({len(issues)} issue(s))"
        print(f"{verdict}: {count} segment(s) from {len(devices)} device(s) audited")
    return 0 if ok else 1


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
    p = sub.add_parser("export", help="decrypt, verify and join one call into a WAV file")
    p.add_argument("call", help="call id")
    p.add_argument("--out", type=Path, required=True, help="WAV file to write")
    p.add_argument("--device")
    p = sub.add_parser("segments", help="list stored segments with their files")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("verify", help="audit signatures and chains of the whole store")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    sub.add_parser("reindex", help="rebuild the index from the store")
    web_cli.add_parsers(sub)
    return parser


COMMANDS = {
    "enroll": cmd_enroll,
    "serve": cmd_serve,
    "serve-https": cmd_serve_https,
    "https-proxy-config": cmd_https_proxy_config,
    "calls": cmd_calls,
    "segments": cmd_segments,
    "export": cmd_export,
    "verify": cmd_verify,
    "reindex": cmd_reindex,
    "web": web_cli.cmd_web,
    "users": web_cli.cmd_users,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
