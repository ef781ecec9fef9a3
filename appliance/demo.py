"""``appliance demo``: the whole data path on one machine, with simulated phone lines.

Everything lives under one folder: ``central/`` (the archive home), ``pki/`` (generated CA and
certificates), ``broker/`` (a private mosquitto on a free loopback port, TLS + ACL), ``box/``
(the box's state, its config ``box/appliance.toml`` and its logs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, StateDirError

if TYPE_CHECKING:
    from central.fleet.registry import Fleet

DEVICE_ID = "demo-box-1"


def _prepare_folder(folder: Path | None) -> Path:
    if folder is None:
        folder = Path.cwd() / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
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


class Demo:
    """Starts and stops the demo's processes in order."""

    def __init__(self, folder: Path, lines: int, *, realtime: bool, seconds: float) -> None:
        from appliance.pki import ensure_pki
        from appliance.seal import DeviceKey
        from appliance.sync.broker import Broker, find_mosquitto
        from central.fleet.registry import Fleet
        from central.home import init_home

        find_mosquitto()  # fail early, in one line, before anything is started
        self.folder = folder
        self.central_home = folder / "central"
        self.box_dir = folder / "box"
        (self.box_dir / "keys").mkdir(parents=True, exist_ok=True)
        (self.box_dir / "logs").mkdir(parents=True, exist_ok=True)
        home = init_home(self.central_home)
        box_key = DeviceKey.load_or_create(self.box_dir / "keys" / "device.key")
        home.enroll(DEVICE_ID, box_key.public_b64)
        # The broker runs on the fleet CA of central's home; the box enrols like a real one.
        fleet = Fleet(home)
        fleet.ensure()
        self.pki = ensure_pki(fleet.pki.dir, ["central"])
        self.broker = Broker(folder / "broker", self.pki)
        self.port = self.broker.start()
        self.config_path = self.box_dir / "appliance.toml"
        keys = self.box_dir / "keys"
        self.config_path.write_text(box_config_text(
            folder, lines=lines, port=self.port, ca=keys / "ca.pem", cert=keys / "client.pem",
            key=keys / "client.key", recipient=home.recipients()[0], realtime=realtime,
            seconds=seconds))
        self._enrol_box(fleet)
        self.receiver = self._spawn("receiver", [
            sys.executable, "-m", "central", "--home", str(self.central_home), "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--ca", str(self.pki.ca_cert),
            "--cert", str(self.pki.client_cert("central")),
            "--key", str(self.pki.client_key("central"))])
        self.fleet = self._spawn("fleet", [
            sys.executable, "-m", "central", "--home", str(self.central_home), "fleet", "serve"])
        self.box = self._spawn("box", [sys.executable, "-m", "appliance", "run",
                                       "--config", str(self.config_path)])

    def _enrol_box(self, fleet: Fleet) -> None:
        """provision -> fleet enroll -> provision --install, as on a real box."""
        from appliance.config import load_config
        from appliance.durable import atomic_write
        from appliance.provision import install_bundle, make_request_document

        cfg = load_config(self.config_path)
        request = self.box_dir / "keys" / "enrolment-request.json"
        request.write_text(json.dumps(make_request_document(cfg)))
        bundle = self.folder / f"{DEVICE_ID}.bundle.json"
        bundle.write_text(json.dumps(fleet.enroll(request, host="127.0.0.1", port=self.port,
                                                  site="demo", tags=["demo"])))
        install_bundle(cfg, bundle)
        # central.toml: the fleet tools find the broker without --broker.
        atomic_write(self.central_home / "central.toml",
                     f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\n'
                     f'ca = "{fleet.pki.ca_cert}"\n'.encode())

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.box_dir / "logs" / f"{name}.log").open("ab") as log:
            # A session of its own: Ctrl-C reaches the demo, which stops everything in order.
            return subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)

    def stop(self) -> None:
        for proc in (self.box, self.receiver, self.fleet):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.broker.stop()

    def read_status(self) -> dict[str, Any]:
        run = self.box_dir / "run"
        out: dict[str, Any] = {}
        for name in ("recorder", "uplink", "capture-main"):
            with contextlib.suppress(OSError, ValueError):
                out[name] = json.loads((run / f"{name}.json").read_text())
        store = self.central_home / "store" / DEVICE_ID
        out["central_segments"] = len(list(store.glob("*.manifest.json"))) if store.is_dir() else 0
        out["fleet"] = _fleet_view(self.central_home)
        return out


def _fleet_view(home: Path) -> str:
    """One line: the box as central's fleet service sees it."""
    from central.fleet.store import FleetStore

    path = home / "fleet" / "fleet.sqlite"
    if not path.exists():
        return "fleet: waiting for the fleet service"
    try:
        with FleetStore(path) as store:
            st = store.status(DEVICE_ID) or {}
            tel = store.telemetry(DEVICE_ID) or {}
    except (ApplianceError, OSError, ValueError) as err:
        return f"fleet: store not readable yet ({err})"
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
    folder = _prepare_folder(folder)
    print(f"demo folder: {folder}", flush=True)
    demo = Demo(folder, lines, realtime=not fast, seconds=seconds)
    tty = sys.stdout.isatty()
    start = time.monotonic()
    last_print = 0.0
    interrupted = False
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
        interrupted = True
    finally:
        _wait_for_upload(demo, timeout_s=15.0)
        demo.stop()
    print(render(demo.read_status(), time.monotonic() - start, seconds))
    _print_next_steps(folder)
    return 130 if interrupted else 0


def _drained(demo: Demo) -> bool:
    st = demo.read_status()
    done = demo.box.poll() is not None or (
        st.get("capture-main", {}).get("state") == "finished")
    return bool(done and st.get("uplink", {}).get("backlog", {}).get("segments", 1) == 0)


def _wait_for_upload(demo: Demo, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        backlog = demo.read_status().get("uplink", {}).get("backlog", {}).get("segments")
        if backlog == 0:
            return
        time.sleep(0.5)


def _print_next_steps(folder: Path) -> None:
    home = folder / "central"
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "central", "--home", str(home), "calls", "--json"],
        capture_output=True, text=True, env=env, check=False)
    calls: list[dict[str, Any]] = []
    with contextlib.suppress(ValueError):
        calls = json.loads(result.stdout or "[]")
    example = calls[0]["call_id"] if calls else "CALL_ID"
    print(f"""
{len(calls)} calls archived at central: {home / 'store'}
  list them:    appliance-central --home {home} calls
  export one:   appliance-central --home {home} export {example} --out call.wav
  segments:     appliance-central --home {home} segments --json
  audit chain:  appliance-central --home {home} verify
  the fleet:    appliance-central --home {home} fleet ls   (while the demo runs:
                appliance-central --home {home} fleet cmd {DEVICE_ID} ping)
box logs: {folder / 'box' / 'logs'}""")
