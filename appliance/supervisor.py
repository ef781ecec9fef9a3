"""``appliance run``: starts each stage as its own process and restarts it, with a rate limit.

A stage that exits with code 2 (bad configuration or missing files) is not restarted: it would
fail the same way; the others keep running, so a broken uplink never stops recording. A finite
capture source (a WAV file, a bounded simulation) that ends with code 0 is done, not crashed.

Where there is no systemd this is the box's supervisor, and it honours the same keep-alives:
each child gets a ``NOTIFY_SOCKET`` of its own and ``WATCHDOG_USEC``; a child that stops sending
``WATCHDOG=1`` (a capture stuck in the driver, a recorder stuck in analysis) is killed and
restarted like a crashed one. Whatever this starts dies with it (see :mod:`appliance.procs`).

It also acts on the uplink's requests (:mod:`appliance.lifecycle`): ``restart`` stops and starts
every stage, ``restart-stages`` the capture and recorder stages (a pushed config), each with the
config as it is on disk now; ``reboot`` it cannot do (the agent refuses it under ``appliance
run``). What each child does is published in ``<run_dir>/supervisor.json`` (pid, start time,
ready, exit code), which the uplink reads to judge whether a pushed config lets the stages
start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance import lifecycle, procs
from appliance.config import Config, load_config
from linerec_contract.durable import ensure_dir, write_status
from linerec_contract.errors import ApplianceError

log = logging.getLogger(__name__)

RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5
BACKOFF_MAX_S = 30.0
STOP_GRACE_S = 15.0


@dataclass
class Child:
    name: str
    argv: list[str]
    watchdog_s: float = 0.0
    """Keep-alive deadline once the child is ready; 0 = not watched."""
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)
    next_start: float = 0.0
    done: bool = False
    sock: socket.socket | None = None
    sock_name: str = ""
    ready: bool = False
    last_alive: float = 0.0
    started_at: float = 0.0  # wall clock of the last start
    exit_code: int | None = None  # of the process last started, once it exited
    exited_at: float | None = None

    def start(self) -> None:
        now = time.monotonic()
        self.starts = [t for t in self.starts if now - t < RESTART_WINDOW_S] + [now]
        env = dict(os.environ)
        env[lifecycle.SUPERVISOR_ENV] = "run"
        self.started_at = time.time()
        self.exit_code = self.exited_at = None
        if self.watchdog_s > 0:
            self._open_socket()
            env["NOTIFY_SOCKET"] = self.sock_name
            env["WATCHDOG_USEC"] = str(int(self.watchdog_s * 1e6))
        self.ready = False
        self.last_alive = now
        self.proc = procs.spawn(self.argv, env=env, start_new_session=False, process_group=0)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def _open_socket(self) -> None:
        if self.sock is not None:
            self._drain()  # messages of the previous process do not count for the new one
            return
        self.sock_name = f"@appliance-run-{os.getpid()}-{self.name}-{secrets.token_hex(4)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + self.sock_name[1:])
        self.sock.setblocking(False)

    def _drain(self) -> list[str]:
        got: list[str] = []
        if self.sock is None:
            return got
        while True:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return got
            got.extend(data.decode(errors="replace").splitlines())

    def keepalive_overdue(self, now: float) -> float | None:
        """Read pending notifications; the silence in seconds when past the deadline."""
        for msg in self._drain():
            if msg == "READY=1":
                self.ready = True
                self.last_alive = now
            elif msg == "WATCHDOG=1":
                self.last_alive = now
        # Before READY=1 the stage is starting (opening a device, recovering a journal).
        limit = self.watchdog_s if self.ready else max(60.0, 4 * self.watchdog_s)
        silent = now - self.last_alive
        return silent if self.watchdog_s > 0 and silent > limit else None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def report(self) -> dict[str, object]:
        return {"pid": self.proc.pid if self.proc is not None else None,
                "started_at": self.started_at, "ready": self.ready,
                "exit_code": self.exit_code, "exited_at": self.exited_at, "done": self.done}


def stage_argv(config_path: Path | None, *stage: str) -> list[str]:
    argv = [sys.executable, "-m", "appliance", "stage", *stage]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv


def children_for(cfg: Config, config_path: Path | None) -> list[Child]:
    wd = cfg.health.watchdog_s
    kids = [Child(f"capture-{c.name}", stage_argv(config_path, "capture", c.name), wd)
            for c in cfg.capture]
    kids.append(Child("recorder", stage_argv(config_path, "recorder"), wd))
    kids.append(Child("uplink", stage_argv(config_path, "uplink"), wd))
    return kids


def supervise(cfg: Config, config_path: Path | None, stop: threading.Event) -> int:
    from appliance import locks

    locks.check_state_dir(cfg.state_dir)
    locks.acquire(cfg.state_dir, "run", "appliance run")
    kids = children_for(cfg, config_path)
    parent = os.getppid()
    ensure_dir(cfg.run_dir)
    stale = lifecycle.take(cfg.state_dir)
    if stale:
        log.info("discarded requests left from before this start: %s", ", ".join(stale))
    published: dict[str, object] = {}
    try:
        for kid in kids:
            kid.start()
        while not stop.is_set():
            kids = act_on_requests(cfg, config_path, kids)
            now = time.monotonic()
            for kid in kids:
                _tend(kid, now)
            published = _publish(cfg, kids, published)
            stop.wait(0.2)
    finally:
        # A parent that died (a demo killed hard) wants everything gone now, not drained.
        drain = cfg.health.drain_on_stop_s if os.getppid() == parent else 0.0
        _stop_all(kids, before_uplink=lambda: drain_outbox(cfg, drain))
    return 0


def act_on_requests(cfg: Config, config_path: Path | None, kids: list[Child]) -> list[Child]:
    """Restart what the uplink asked for (see :mod:`appliance.lifecycle`); the children now."""
    actions = lifecycle.take(cfg.state_dir)
    if "reboot" in actions:
        log.error("a reboot was requested, but appliance run cannot reboot the machine: ignored")
    if "restart" in actions:
        return restart_children(cfg, config_path, kids, lambda name: True)
    if "restart-stages" in actions:
        return restart_children(cfg, config_path, kids, lambda name: name != "uplink")
    return kids


def restart_children(cfg: Config, config_path: Path | None, kids: list[Child],
                     chosen: Callable[[str], bool]) -> list[Child]:
    """Stop the chosen children (in stop order) and start them again with the config on disk
    now (a pushed config may add or remove capture streams)."""
    try:
        fresh = load_config(config_path)
    except ApplianceError as err:
        log.error("restart: the config does not load (%s): the stages start as configured "
                  "before", err)
        fresh = cfg
    old = [k for k in kids if chosen(k.name)]
    log.warning("restarting %s on request", ", ".join(k.name for k in old))
    _stop_all(old)
    started = [k for k in children_for(fresh, config_path) if chosen(k.name)]
    for kid in started:
        kid.start()
    order = {k.name: i for i, k in enumerate(children_for(fresh, config_path))}
    return sorted([*started, *(k for k in kids if not chosen(k.name))],
                  key=lambda k: order.get(k.name, len(order)))


def _publish(cfg: Config, kids: list[Child], before: dict[str, object]) -> dict[str, object]:
    """Write ``supervisor.json`` when a child's state changed; returns what was written."""
    children: dict[str, object] = {k.name: k.report() for k in kids}
    if children == before:
        return before
    try:
        write_status(cfg.run_dir / "supervisor.json",
                     {"ts": time.time(), "pid": os.getpid(), "children": children})
    except OSError as err:  # advisory: never stop supervising for a status file
        log.warning("supervisor status %s: %s", cfg.run_dir / "supervisor.json", err.strerror)
    return children


def drain_outbox(cfg: Config, bound_s: float) -> str:
    """Wait up to ``bound_s`` while the uplink sends what is left; say why it stopped waiting."""
    import json

    from appliance.sync.outbox import Outbox

    deadline = time.monotonic() + bound_s
    while True:
        try:
            left = Outbox(cfg.outbox_dir).backlog().segments if cfg.outbox_dir.is_dir() else 0
        except OSError:
            left = 0
        if left == 0:
            return "outbox empty"
        try:
            up = json.loads((cfg.run_dir / "uplink.json").read_text())
        except (OSError, ValueError):
            up = {}
        link = str(up.get("link", "unknown"))
        why = ""
        if cfg.uplink.transport == "none":
            why = "uplink.transport = 'none'"
        elif link not in ("ready", "up"):
            why = f"link {link}"
        elif time.monotonic() >= deadline:
            why = f"not sent within {bound_s:.0f} s"
        if why:
            log.warning("stopping with %d segments in the outbox (%s): they are sent on the "
                        "next start", left, why)
            return why
        time.sleep(0.2)


def _tend(kid: Child, now: float) -> None:
    if kid.done or kid.proc is None:
        if not kid.done and now >= kid.next_start:
            kid.start()
        return
    code = kid.proc.poll()
    if code is None:
        silent = kid.keepalive_overdue(now)
        if silent is None:
            return
        log.error("%s (pid %d) sent no keep-alive for %.0f s: killing it", kid.name,
                  kid.proc.pid, silent)
        procs.kill_group(kid.proc)
        kid.proc.wait()
        code = kid.proc.returncode
    else:
        procs.kill_group(kid.proc)  # whatever the stage started goes with it
    kid.proc = None
    kid.exit_code, kid.exited_at = code, time.time()
    if code == 0 and kid.name.startswith("capture-"):
        log.info("%s finished (finite source)", kid.name)
        kid.done = True
    elif code == 2:
        log.error("%s exited with a configuration error: not restarted", kid.name)
        kid.done = True
    else:
        recent = len(kid.starts)
        delay = min(BACKOFF_MAX_S, 0.5 * 2 ** max(recent - 1, 0))
        if recent >= MAX_RESTARTS_IN_WINDOW:
            delay = BACKOFF_MAX_S
        log.error("%s exited with code %d: restarting in %.1f s", kid.name, code, delay)
        kid.next_start = now + delay


def stop_order(kids: list[Child]) -> list[list[Child]]:
    """Capture first (nothing new enters the journal), then the recorder (seals what it
    holds), then the uplink (it sends what the recorder sealed on the way out)."""
    return [[k for k in kids if k.name.startswith("capture-")],
            [k for k in kids if k.name == "recorder"],
            [k for k in kids if k.name == "uplink"]]


def _stop_all(kids: list[Child], grace_s: float = STOP_GRACE_S,
              before_uplink: Callable[[], object] | None = None) -> None:
    for group in stop_order(kids):
        if before_uplink is not None and any(k.name == "uplink" for k in group):
            before_uplink()
        running = [k.proc for k in group if k.proc is not None and k.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pid %d did not stop in %.0f s: killing it", proc.pid, grace_s)
                proc.kill()
                proc.wait()
    for kid in kids:
        if kid.proc is not None:
            procs.kill_group(kid.proc)
        kid.close()
