"""Entry points of the box's processes: capture (one per stream), recorder+sealer, uplink.

Each stage is a separate OS process so that a crash or a stall in one cannot stall capture.
``appliance run`` (see :mod:`appliance.supervisor`) starts them; each can also run on its own
(``appliance stage NAME``), which is how the OS image's systemd units start them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import sdnotify
from appliance.config import Config
from linerec_contract.durable import ensure_dir, write_status
from linerec_contract.errors import ApplianceError, ConfigError

if TYPE_CHECKING:
    from appliance.sync.outbox import Outbox

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the stage finishes its step, syncs and exits."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@contextlib.contextmanager
def exit_recorded(cfg: Config, name: str) -> Iterator[None]:
    """Keep the one-line error a stage stops with in ``<run_dir>/<name>.exit.json`` (removed
    when it starts), so its supervisor can say why it did not start (a pushed config's report
    names it)."""
    path = cfg.run_dir / f"{name}.exit.json"
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    try:
        yield
    except ApplianceError as err:
        with contextlib.suppress(OSError):  # advisory: the error itself goes on
            write_status(path, {"ts": time.time(), "exit_code": err.exit_code,
                                "error": str(err)})
        raise


def load_recipients(cfg: Config) -> list[str]:
    """The age recipients segments are encrypted to: config first, else keys/recipients.txt."""
    if cfg.seal.recipients:
        return list(cfg.seal.recipients)
    path = cfg.keys_dir / "recipients.txt"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as err:
        raise ConfigError(
            f"no recipients: set seal.recipients or provision {path} (age1... keys, one per line)"
        ) from err
    recipients = [ln.strip() for ln in lines if ln.strip().startswith("age1")]
    if not recipients:
        raise ConfigError(f"{path} holds no age1... recipient")
    return recipients


def run_capture_stage(cfg: Config, stream_name: str, stop: threading.Event) -> None:
    from appliance.capture import run_capture

    sections = {c.name: c for c in cfg.capture}
    if stream_name not in sections:
        raise ConfigError(f"capture stream {stream_name!r} is not configured "
                          f"(configured: {', '.join(sections)})")
    ensure_dir(cfg.ring_path(stream_name).parent)
    ensure_dir(cfg.run_dir)
    run_capture(cfg, sections[stream_name], stop)


def run_recorder_stage(cfg: Config, stop: threading.Event) -> None:
    from appliance.recorder.service import Recorder
    from linerec_contract.identity import DeviceKey

    ensure_dir(cfg.run_dir)
    key = DeviceKey.load_or_create(cfg.keys_dir / "device.key")
    recorder = Recorder(cfg, recipients=load_recipients(cfg), key=key)
    recorder.run(stop, status_path=cfg.run_dir / "recorder.json")


def run_uplink_stage(cfg: Config, stop: threading.Event,
                     config_path: Path | None = None) -> None:
    from appliance.sync.outbox import outbox_for
    from appliance.sync.uplink_base import UplinkBase

    ensure_dir(cfg.run_dir)
    outbox = outbox_for(cfg)
    u = cfg.uplink
    if u.transport == "none":
        log.info("uplink.transport = 'none': segments stay in the outbox")
        notifier = sdnotify.notifier()
        while not stop.is_set():
            notifier.watchdog()
            _none_status(cfg, outbox)
            stop.wait(notifier.max_wait(1.0))
        return
    ca, cert, key = cfg.tls_paths()
    for what, path in (("uplink.ca", ca), ("uplink.cert", cert), ("uplink.key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{what}: file {path} does not exist (provision the box's TLS files)")
    status_path = cfg.run_dir / "uplink.json"
    uplink: UplinkBase
    if u.transport == "https":
        from appliance.sync.https_uplink import HttpsUplink, parse_https_url

        host, port = parse_https_url(u.https_url) if u.https_url else (u.host, u.port)
        uplink = HttpsUplink(device_id=cfg.device.id, outbox=outbox, host=host, port=port,
                             ca=ca, cert=cert, key=key, status_path=status_path,
                             ack_timeout_s=u.ack_timeout_s, max_kbps=u.max_kbps, order=u.order,
                             chunk_bytes=u.chunk_bytes)
    else:
        from appliance.provision import broker_address, central_command_key
        from appliance.sync.fleet_agent import FleetAgent
        from appliance.sync.uplink import Uplink
        from appliance.sync.uplink_base import boot_id

        host, port = broker_address(cfg)
        agent = FleetAgent(cfg, central_key=central_command_key(cfg), boot_id=boot_id(),
                           config_path=config_path)
        uplink = Uplink(device_id=cfg.device.id, outbox=outbox, host=host, port=port,
                        ca=ca, cert=cert, key=key, status_path=status_path, window=u.window,
                        ack_timeout_s=u.ack_timeout_s, max_kbps=u.max_kbps, order=u.order,
                        chunk_bytes=u.chunk_bytes, keepalive_s=u.keepalive_s, agent=agent)
    uplink.run(stop)


def _none_status(cfg: Config, outbox: Outbox) -> None:
    """The status file of an uplink that sends nothing (``transport = "none"``)."""
    try:
        b = outbox.backlog()
        write_status(cfg.run_dir / "uplink.json", {
            "ts": time.time(), "link": "none", "transport": "none", "alarms": [],
            "last_ack_ts": None, "backlog": {"segments": b.segments, "bytes": b.bytes,
                                             "oldest_age_s": round(b.oldest_age_s, 3)}})
    except OSError as err:  # advisory: never stop the stage for a status file
        log.warning("uplink: status file: %s", err.strerror)
