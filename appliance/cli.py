"""The ``appliance`` command line. Exit codes: 0 ok, 1 failed check, 2 bad usage or input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from appliance import __version__
from appliance.config import Config, load_config
from linerec_contract.errors import ApplianceError, UsageError

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

    smp = sub.add_parser(
        "sample", help="record a short WAV through the capture path",
        description="Records from an ALSA device through the capture path (format conversion, "
                    "resampling) into a WAV holding what the journal would store: 16-bit PCM at "
                    "the storage rate, one channel per line. Prints each channel's level.")
    smp.add_argument("--device", required=True,
                     help="ALSA PCM name (e.g. hw:CARD=U18,DEV=0) or card id; see 'appliance devices'")
    smp.add_argument("--channels", type=_positive_int,
                     help="channels to keep, the first N (default: every channel of the device)")
    smp.add_argument("--rate", type=_positive_int,
                     help="rate to open the device at, Hz (default: the device's preferred rate)")
    smp.add_argument("--format", dest="sample_format", default="auto",
                     choices=["auto", "S16_LE", "S24_3LE", "S24_LE", "S32_LE", "FLOAT_LE"],
                     help="sample format to open the device with (default auto)")
    smp.add_argument("--storage-rate", type=int, default=8000, choices=[8000, 16000],
                     help="rate of the WAV written, as the journal stores it (default 8000)")
    smp.add_argument("--seconds", type=_positive_float, required=True,
                     help="length of the take, seconds (at most 3600)")
    smp.add_argument("--out", type=Path, required=True, help="WAV file to write")

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

    stest = sub.add_parser(
        "selftest", help="the technician's hardware checks (PASS/WARN/FAIL with a hint each)",
        description="Runs the hardware, line, storage, clock and network checks, prints one row "
                    "per check, keeps the result under <state_dir>/selftest/last.json. Exit 0 when "
                    "nothing failed, 1 when a check failed or a step waits for the technician.")
    stest.add_argument("--config", type=Path, help="TOML file (default /etc/appliance/appliance.toml)")
    stest.add_argument("--json", action="store_true", help="print the result as JSON")
    stest.add_argument("--junit", type=Path, metavar="FILE", help="also write JUnit XML to FILE")
    stest.add_argument("--only", nargs="+", metavar="CHECK",
                       help="run only these checks (names as in hw-tests/CHECKS.md)")
    stest.add_argument("--continue", dest="resume", action="store_true",
                       help="resume the waiting session (after plugging the test plug, or a reboot)")
    stest.add_argument("--no-prompt", action="store_true",
                       help="never wait at the keyboard: stop at a manual step (resume with --continue)")

    mon = sub.add_parser(
        "monitor", help="live per-line meters, call state and DTMF (for wiring; needs no keys)",
        description="Live view of every line: level meter (dBFS) with peak hold, noise floor, "
                    "clipping and hum, call state, DTMF digits, alarms. Quit with q or Ctrl-C.")
    mon.add_argument("--config", type=Path, help="TOML file (default /etc/appliance/appliance.toml)")
    mon.add_argument("--seconds", type=_positive_float, help="stop after this long (default: until q)")

    prov = sub.add_parser("provision", help="the box's keys and enrolment request; install a bundle")
    prov.add_argument("--config", type=Path)
    prov.add_argument("--install", type=Path, metavar="BUNDLE", help="central's enrolment bundle")
    prov.add_argument("--out", type=Path, help="where to write the request (default keys/)")

    buf = sub.add_parser("buffer", help="ring journal tools")
    bsub = buf.add_subparsers(dest="buffer_command", required=True, parser_class=OneLineParser)
    chk = bsub.add_parser("check", help="report the state of a journal without changing it")
    chk.add_argument("path", type=Path)
    chk.add_argument("--json", action="store_true")

    bchk = sub.add_parser("boot-check",
                          help="health gate of a new root slot: selftest and a sealed test call")
    bchk.add_argument("--config", type=Path, help="TOML file (default /etc/appliance/appliance.toml)")
    return p


def _config(path: Path | None) -> Config:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.stages import stop_on_signals
    from appliance.supervisor import supervise

    cfg = _config(args.config)
    return supervise(cfg, args.config, stop_on_signals())


def cmd_stage(args: argparse.Namespace) -> int:
    from appliance import locks, stages

    cfg = _config(args.config)
    stream = args.stream or cfg.capture[0].name
    name = f"capture-{stream}" if args.name == "capture" else args.name
    locks.check_state_dir(cfg.state_dir)
    locks.acquire(cfg.state_dir, name, f"appliance stage {args.name}"
                  + (f" {stream}" if args.name == "capture" else ""))
    stop = stages.stop_on_signals()
    with stages.exit_recorded(cfg, name):
        if args.name == "capture":
            stages.run_capture_stage(cfg, stream, stop)
        elif args.name == "recorder":
            stages.run_recorder_stage(cfg, stop)
        else:
            stages.run_uplink_stage(cfg, stop, config_path=args.config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(seconds=args.seconds, lines=args.lines, folder=args.dir, fast=args.fast)


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.status import status_command

    return status_command(_config(args.config), as_json=args.json)


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.verify import refuse_non_regular, verify_command

    refuse_non_regular(args.segments)

    pubkey = args.pubkey
    cfg = _config(args.config) if pubkey is None or args.config else None
    if pubkey is None:
        from linerec_contract.identity import DeviceKey

        assert cfg is not None
        pubkey = DeviceKey.load(cfg.keys_dir / "device.key").public_b64
    start, note = (0, "") if cfg is None else box_chain_start(cfg, args.segments)
    return verify_command(args.segments, pubkey, as_json=args.json, start_seq=start,
                          start_note=note)


def box_chain_start(cfg: Config, paths: list[Path]) -> tuple[int, str]:
    """On a live box the chain starts after the last acknowledged segment: central holds the
    ones before it and the outbox deleted them."""
    from appliance.sync.outbox import Outbox

    outbox = cfg.outbox_dir.resolve()
    if not cfg.outbox_dir.is_dir() or not any(p.resolve().is_relative_to(outbox) for p in paths):
        return 0, ""
    acked = Outbox(cfg.outbox_dir).highest_acked()
    if acked is None:
        return 0, ""
    return acked + 1, (f"chain checked from seq {acked + 1}: segments up to {acked} were "
                       "acknowledged by central and removed from the outbox")


def cmd_devices(args: argparse.Namespace) -> int:
    from appliance.audio.devices import devices_command

    return devices_command(as_json=args.json)


def cmd_sample(args: argparse.Namespace) -> int:
    from appliance.audio.devices import sample_command

    return sample_command(device=args.device, channels=args.channels, rate=args.rate,
                          seconds=args.seconds, out=args.out, sample_format=args.sample_format,
                          storage_rate=args.storage_rate)


def cmd_keys(args: argparse.Namespace) -> int:
    from appliance.recorder.service import NEXT_KEY_FILE
    from linerec_contract.identity import DeviceKey

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


def cmd_selftest(args: argparse.Namespace) -> int:
    from appliance.selftest.command import selftest_command

    return selftest_command(_config(args.config), only=args.only, as_json=args.json,
                            junit=args.junit, resume=args.resume,
                            prompt=False if args.no_prompt else None)


def cmd_monitor(args: argparse.Namespace) -> int:
    from appliance.monitor import monitor_command

    return monitor_command(_config(args.config), seconds=args.seconds or 0.0)


def cmd_buffer(args: argparse.Namespace) -> int:
    from appliance.buffer import buffer_check_command

    return buffer_check_command(args.path, as_json=args.json)


def cmd_provision(args: argparse.Namespace) -> int:
    from appliance.provision import provision_command

    return provision_command(_config(args.config), install=args.install, out=args.out)


def cmd_boot_check(args: argparse.Namespace) -> int:
    from appliance.bootcheck import boot_check_command

    return boot_check_command(_config(args.config))


COMMANDS = {
    "provision": cmd_provision,
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
    "selftest": cmd_selftest,
    "monitor": cmd_monitor,
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
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except ApplianceError as err:
        print(f"appliance: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away ('appliance status | head'): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def dump_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))
