"""``appliance demo``: the whole data path on one machine, with simulated phone lines.

Everything lives under one folder: ``central/`` (the archive home), ``pki/`` (generated CA and
certificates), ``broker/`` (a private mosquitto on a free loopback port, TLS + ACL), ``box/``
(the box's state, its config ``box/appliance.toml`` and its logs).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance import procs
from linerec_contract.durable import atomic_write, ensure_dir
from linerec_contract.errors import StateDirError

DEVICE_ID = "demo-box-1"
FLEET_VIEW_S = 5.0


def _prepare_folder(folder: Path | None) -> Path:
    if folder is None:
        folder = Path.cwd() / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        ensure_dir(folder)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise StateDirError(f"--dir {folder}: cannot write there ({err.strerror}); "
                            "pass a folder you can write to") from err
    return folder.resolve()


def box_config_text(folder: Path, *, lines: int, port: int, ca: Path, cert: Path, key: Path,
                    recipient: str, realtime: bool, seconds: float) -> str:
    """The demo box's appliance.toml (also used by the end-to-end tests)."""
    return f"""# Demo box: simulated lines, everything under {folder}
[device]
id = "{DEVICE_ID}"

[paths]
state_dir = "{folder / 'box'}"

[[capture]]
name = "main"
source = "simulator"
sim_lines = {lines}
sim_seed = 7
sim_mean_idle_s = 8.0
sim_mean_call_s = 15.0
sim_max_call_s = 45.0
realtime = {str(realtime).lower()}
stop_after_s = {0.0 if realtime else seconds}

[ring]
size_mb = {16 if realtime else 64}

[recorder]
max_segment_s = 30.0

[seal]
codec = "flac"
recipients = ["{recipient}"]

[uplink]
host = "127.0.0.1"
port = {port}
ca = "{ca}"
cert = "{cert}"
key = "{key}"
ack_timeout_s = 10.0

[fleet]
telemetry_interval_s = 5.0
"""


@dataclass
class StopReport:
    broker_alive: bool
    """Whether the broker was still running when the demo stopped."""
    box_code: int


class Demo:
    """Starts and stops the demo's processes in order."""

    def __init__(self, folder: Path, lines: int, *, realtime: bool, seconds: float) -> None:
        from appliance.sync.broker import Broker, find_mosquitto
        from linerec_contract.identity import DeviceKey
        from linerec_contract.pki import ensure_pki

        self._fleet_line, self._fleet_at = "fleet: waiting for the fleet service", 0.0
        find_mosquitto()  # fail early, in one line, before anything is started
        self.folder = folder
        self.central_home = folder / "central"
        self.box_dir = folder / "box"
        ensure_dir(self.box_dir / "keys", 0o700)
        ensure_dir(self.box_dir / "logs")
        # Central is another program: the demo drives it through its command line only.
        recipient = self._central("init").split()[0]
        box_key = DeviceKey.load_or_create(self.box_dir / "keys" / "device.key")
        self._central("enroll", DEVICE_ID, box_key.public_b64)
        # The broker runs on the fleet CA of central's home; the box enrols like a real one.
        self.pki = ensure_pki(self.central_home / "fleet" / "pki", ["central"])
        self.broker = Broker(folder / "broker", self.pki)
        self.port = self.broker.start()
        self.config_path = self.box_dir / "appliance.toml"
        keys = self.box_dir / "keys"
        self.config_path.write_text(box_config_text(
            folder, lines=lines, port=self.port, ca=keys / "ca.pem", cert=keys / "client.pem",
            key=keys / "client.key", recipient=recipient, realtime=realtime,
            seconds=seconds))
        self._enrol_box()
        self.receiver = self._spawn("receiver", [
            sys.executable, "-m", "central", "--home", str(self.central_home), "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--ca", str(self.pki.ca_cert),
            "--cert", str(self.pki.client_cert("central")),
            "--key", str(self.pki.client_key("central"))])
        self.fleet = self._spawn("fleet", [
            sys.executable, "-m", "central", "--home", str(self.central_home), "fleet", "serve"])
        self.box = self._spawn("box", [sys.executable, "-m", "appliance", "run",
                                       "--config", str(self.config_path)])

    def _central(self, *args: str) -> str:
        """Run one ``appliance-central`` command on the demo's home; its standard output."""
        argv = [sys.executable, "-m", "central", "--home", str(self.central_home), *args]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise StateDirError(f"appliance-central {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def _enrol_box(self) -> None:
        """provision -> fleet enroll -> provision --install, as on a real box."""
        from appliance.config import load_config
        from appliance.provision import install_bundle, make_request_document

        # central.toml: the fleet tools find the broker without --broker.
        atomic_write(self.central_home / "central.toml",
                     f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\n'
                     f'ca = "{self.pki.ca_cert}"\n'.encode())
        cfg = load_config(self.config_path)
        request = self.box_dir / "keys" / "enrolment-request.json"
        request.write_text(json.dumps(make_request_document(cfg)))
        bundle = self.folder / f"{DEVICE_ID}.bundle.json"
        self._central("fleet", "enroll", str(request), "--out", str(bundle),
                      "--site", "demo", "--tag", "demo")
        install_bundle(cfg, bundle)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.box_dir / "logs" / f"{name}.log").open("ab") as log:
            # A session of its own: Ctrl-C reaches the demo, which stops everything in order.
            # Owned: if the demo dies however it dies, the kernel stops these too.
            return procs.spawn(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def stop(self) -> StopReport:
        """Stop in order: the box (capture, then the recorder seals what it holds, then the
        uplink sends what it can: see :mod:`appliance.supervisor`), then central, the broker."""
        broker_alive = self.broker.running
        box_code = procs.stop(self.box, grace_s=60.0)
        procs.stop(self.receiver, grace_s=20.0)
        procs.stop(self.fleet, grace_s=20.0)
        self.broker.stop()
        return StopReport(broker_alive=broker_alive, box_code=box_code)

    def read_status(self) -> dict[str, Any]:
        run = self.box_dir / "run"
        out: dict[str, Any] = {}
        for name in ("recorder", "uplink", "capture-main"):
            with contextlib.suppress(OSError, ValueError):
                out[name] = json.loads((run / f"{name}.json").read_text())
        store = self.central_home / "store" / DEVICE_ID
        out["central_segments"] = len(list(store.glob("*.manifest.json"))) if store.is_dir() else 0
        # central's view costs a process start: asked at most every FLEET_VIEW_S while online.
        now = time.monotonic()
        if now - self._fleet_at >= FLEET_VIEW_S or " online," not in self._fleet_line:
            self._fleet_line, self._fleet_at = _fleet_view(self.central_home), now
        out["fleet"] = self._fleet_line
        return out


def _fleet_view(home: Path) -> str:
    """One line: the box as central's fleet service sees it (through central's command line)."""
    argv = [sys.executable, "-m", "central", "--home", str(home), "fleet", "show", DEVICE_ID,
            "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return "fleet: waiting for the fleet service"
    try:
        shown = json.loads(done.stdout)
    except ValueError:
        return "fleet: waiting for the fleet service"
    st = shown.get("status") or {}
    tel = shown.get("telemetry") or {}
    age = f"{time.time() - tel['received_at']:.0f} s ago" if tel.get("received_at") else "none yet"
    return f"fleet: {DEVICE_ID} {st.get('state', 'not seen yet')}, telemetry {age}"


def render(status: dict[str, Any], elapsed: float, total: float) -> str:
    rec = status.get("recorder", {})
    up = status.get("uplink", {})
    rows = [f"appliance demo  {elapsed:5.0f}/{total:.0f} s   (Ctrl-C stops)", ""]
    rows.append(f"{'line':<8}{'state':<10}{'level dBFS':>11}{'peak':>7}   call")
    # Levels come from capture's meters (the last second), call state from the recorder.
    meters = {m.get("line"): m for m in status.get("capture-main", {}).get("lines", [])}
    for ln in rec.get("lines", []):
        state = "IN CALL" if ln.get("in_call") else "idle"
        meter = meters.get(ln["line"], {})
        level = meter.get("level_dbfs", ln.get("level_db", -120.0))
        peak = meter.get("peak_dbfs", level)
        rows.append(f"{ln['line']:<8}{state:<10}{level:>11.1f}{peak:>7.1f}   "
                    f"{ln.get('call_id') or ''}")
    backlog = up.get("backlog", {})
    rows += [
        "",
        f"segments sealed: {rec.get('sealed', 0)}   "
        f"outbox backlog: {backlog.get('segments', 0)} ({backlog.get('bytes', 0)} B)   "
        f"link: {up.get('link', 'starting')}   "
        f"stored at central: {status.get('central_segments', 0)}",
        status.get("fleet", ""),
    ]
    return "\n".join(rows)


def run_demo(*, seconds: float, lines: int, folder: Path | None, fast: bool) -> int:
    # Ctrl-C stops the demo in order even when it was started with SIGINT ignored (a script's
    # background job inherits that), as it stops 'appliance run'.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    folder = _prepare_folder(folder)
    print(f"demo folder: {folder}", flush=True)
    demo = Demo(folder, lines, realtime=not fast, seconds=seconds)
    tty = sys.stdout.isatty()
    start = time.monotonic()
    last_print = 0.0
    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds and not fast:
                break
            if fast and _drained(demo) and elapsed > 3:
                break
            view = render(demo.read_status(), elapsed, seconds)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + view + "\n")
                sys.stdout.flush()
            elif elapsed - last_print >= 5:
                print(view.replace("\n\n", "\n"), "\n", flush=True)
                last_print = elapsed
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nCtrl-C: stopping", flush=True)
    finally:
        print("stopping: capture, then the recorder seals open calls, then the uplink sends "
              "the outbox (bounded)", flush=True)
        # A second Ctrl-C while stopping would leave the archive short: stop once, in order.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            report = demo.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
    print(render(demo.read_status(), time.monotonic() - start, seconds))
    _print_outcome(demo, report)
    _print_next_steps(folder)
    return 0


def _drained(demo: Demo) -> bool:
    st = demo.read_status()
    done = demo.box.poll() is not None or (
        st.get("capture-main", {}).get("state") == "finished")
    return bool(done and st.get("uplink", {}).get("backlog", {}).get("segments", 1) == 0)


def _print_outcome(demo: Demo, report: StopReport) -> None:
    """What reached central and what did not, and why."""
    from appliance.sync.outbox import Outbox

    outbox = demo.box_dir / "outbox"
    left = Outbox(outbox).backlog().segments if outbox.is_dir() else 0
    if not report.broker_alive:
        print("ATTENTION: the MQTT broker had died before the demo stopped "
              f"(see {demo.folder / 'broker'}): uploads stopped then")
    if report.box_code not in (0, -signal.SIGTERM):
        print(f"ATTENTION: the box exited with code {report.box_code} "
              f"(see {demo.box_dir / 'logs' / 'box.log'})")
    if left:
        up = demo.read_status().get("uplink", {})
        if not report.broker_alive:
            why = "the broker died"
        elif up.get("link") != "ready":
            why = f"the link was {up.get('link', 'not up')}"
        else:
            why = "they were not acknowledged before the stop's time bound"
        print(f"{left} segments are still in the outbox ({outbox}): {why}; "
              "they are sent when the box runs again")
    else:
        print("outbox empty: every sealed segment reached central")


def _central_cmd() -> str:
    """The archive's command as an absolute path: it works without .venv/bin on PATH."""
    exe = Path(sys.executable).parent / "appliance-central"
    if exe.is_file():
        return shlex.quote(str(exe))
    found = shutil.which("appliance-central")
    return shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m central"


def _print_next_steps(folder: Path) -> None:
    home = folder / "central"
    result = subprocess.run(
        [sys.executable, "-m", "central", "--home", str(home), "calls", "--json"],
        capture_output=True, text=True, check=False)
    calls: list[dict[str, Any]] = []
    with contextlib.suppress(ValueError):
        calls = json.loads(result.stdout or "[]")
    example = shlex.quote(str(calls[0]["call_id"])) if calls else "CALL_ID"
    cmd = f"{_central_cmd()} --home {shlex.quote(str(home))}"
    print(f"""
{len(calls)} calls archived at central: {home / 'store'}
  list them:    {cmd} calls
  export one:   {cmd} export {example} --out call.wav
  segments:     {cmd} segments --json
  audit chain:  {cmd} verify
  the fleet:    {cmd} fleet ls   (while the demo runs: {cmd} fleet cmd {DEVICE_ID} ping)
box logs: {folder / 'box' / 'logs'}""")
