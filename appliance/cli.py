"""The ``appliance`` command line. Exit codes: 0 ok, 1 failed check, 2 bad usage or input."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from appliance import __version__
from appliance.config import Config, load_config
from appliance.errors import ApplianceError, UsageError

log = logging.getLogger("appliance")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (and exit code 2), without the usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="appliance", description="Edge call-recording appliance.")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="run the box (capture, recorder, uplink)")
    run.add_argument("--config", type=Path, help="TOML file (default /etc/appliance/appliance.toml)")

    demo = sub.add_parser("demo", help="simulated lines, a private broker and a local central")
    demo.add_argument("--seconds", type=_positive_float, default=60.0, help="how long (default 60)")
    demo.add_argument("--lines", type=_positive_int, default=4, help="simulated lines (default 4)")
    demo.add_argument("--dir", type=Path, help="state folder (default: a new ./demo-<time>)")
    demo.add_argument("--fast", action="store_true",
                      help="simulate faster than real time (no live pacing)")

    stage = sub.add_parser("stage", help="run one stage of the box (used by 'run' and systemd)")
    stage.add_argument("name", choices=["capture", "recorder", "uplink"])
    stage.add_argument("stream", nargs="?", default=None, help="capture stream name")
    stage.add_argument("--config", type=Path)

    st = sub.add_parser("status", help="state of the local box")
    st.add_argument("--config", type=Path)
    st.add_argument("--json", action="store_true")

    ver = sub.add_parser("verify", help="check signatures, hashes and chain of sealed segments")
    ver.add_argument("segments", nargs="+", type=Path)
    ver.add_argument("--pubkey", help="the box's Ed25519 public key (base64); default: keys/device.key")
    ver.add_argument("--config", type=Path)
    ver.add_argument("--json", action="store_true")

    dev = sub.add_parser("devices", help="capture devices with their channels, rates and formats")
    dev.add_argument("--json", action="store_true")

    smp = sub.add_parser("sample", help="record a short WAV through the capture path")
    smp.add_argument("--device", required=True)
    smp.add_argument("--channels", type=_positive_int)
    smp.add_argument("--rate", type=_positive_int)
    smp.add_argument("--seconds", type=_positive_float, required=True)
    smp.add_argument("--out", type=Path, required=True)

    keys = sub.add_parser("keys", help="the box's signing key")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=OneLineParser)
    kshow = ksub.add_parser("show", help="print the key id and public key (for enrolment)")
    kshow.add_argument("--config", type=Path)
    krot = ksub.add_parser("rotate", help="make a new key; the next sealed segment announces it")
    krot.add_argument("--config", type=Path)

    ana = sub.add_parser("analyze", help="call detection, DTMF, tones and caller ID over a WAV file")
    ana.add_argument("wav", type=Path, metavar="FILE.wav")
    ana.add_argument("--config", type=Path)
    ana.add_argument("--json", action="store_true")

    buf = sub.add_parser("buffer", help="ring journal tools")
    bsub = buf.add_subparsers(dest="buffer_command", required=True, parser_class=OneLineParser)
    chk = bsub.add_parser("check", help="report the state of a journal without changing it")
    chk.add_argument("path", type=Path)
    chk.add_argument("--json", action="store_true")

    sub.add_parser("boot-check", help="health gate of a new root slot: selftest and a sealed test call")
    return p


def _config(path: Path | None) -> Config:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.stages import stop_on_signals
    from appliance.supervisor import supervise

    cfg = _config(args.config)
    return supervise(cfg, args.config, stop_on_signals())


def cmd_stage(args: argparse.Namespace) -> int:
    from appliance import stages
    from appliance.supervisor import die_with_parent

    die_with_parent()
    cfg = _config(args.config)
    stop = stages.stop_on_signals()
    if args.name == "capture":
        stages.run_capture_stage(cfg, args.stream or cfg.capture[0].name, stop)
    elif args.name == "recorder":
        stages.run_recorder_stage(cfg, stop)
    else:
        stages.run_uplink_stage(cfg, stop)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(seconds=args.seconds, lines=args.lines, folder=args.dir, fast=args.fast)


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.status import status_command

    return status_command(_config(args.config), as_json=args.json)


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.verify import verify_command

    pubkey = args.pubkey
    if pubkey is None:
        from appliance.seal import DeviceKey

        pubkey = DeviceKey.load(_config(args.config).keys_dir / "device.key").public_b64
    return verify_command(args.segments, pubkey, as_json=args.json)


def cmd_devices(args: argparse.Namespace) -> int:
    from appliance.audio.devices import devices_command

    return devices_command(as_json=args.json)


def cmd_sample(args: argparse.Namespace) -> int:
    from appliance.audio.devices import sample_command

    return sample_command(device=args.device, channels=args.channels, rate=args.rate,
                          seconds=args.seconds, out=args.out)


def cmd_keys(args: argparse.Namespace) -> int:
    from appliance.recorder.service import NEXT_KEY_FILE
    from appliance.seal import DeviceKey

    cfg = _config(args.config)
    if args.keys_command == "show":
        key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
        print(f"device {cfg.device.id}\nkey_id {key.key_id}\npublic_b64 {key.public_b64}")
        return 0
    path = cfg.keys_dir / NEXT_KEY_FILE
    if path.exists():
        key = DeviceKey.load(path)
        print(f"a rotation to {key.key_id} is already pending: it is announced in the next segment")
        return 0
    key = DeviceKey.generate()
    key.save(path)
    print(f"new key {key.key_id} ({key.public_b64}): the next sealed segment announces it, "
          "signed by the current key, and the box then switches")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from appliance.analyze import analyze_command

    return analyze_command(_config(args.config), args.wav, as_json=args.json)


def cmd_buffer(args: argparse.Namespace) -> int:
    from appliance.buffer import buffer_check_command

    return buffer_check_command(args.path, as_json=args.json)


def cmd_boot_check(args: argparse.Namespace) -> int:
    from appliance.bootcheck import boot_check_command

    return boot_check_command()


COMMANDS = {
    "run": cmd_run,
    "stage": cmd_stage,
    "demo": cmd_demo,
    "status": cmd_status,
    "verify": cmd_verify,
    "devices": cmd_devices,
    "sample": cmd_sample,
    "buffer": cmd_buffer,
    "keys": cmd_keys,
    "analyze": cmd_analyze,
    "boot-check": cmd_boot_check,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        return COMMANDS[args.command](args)
    except ApplianceError as err:
        print(f"appliance: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def dump_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
