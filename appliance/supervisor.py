"""``appliance run``: starts each stage as its own process and restarts it, with a rate limit.

A stage that exits with code 2 (bad configuration or missing files) is not restarted: it would
fail the same way; the others keep running, so a broken uplink never stops recording. A finite
capture source (a WAV file, a bounded simulation) that ends with code 0 is done, not crashed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config import Config

log = logging.getLogger(__name__)

RESTART_WINDOW_S = 60.0
MAX_RESTARTS_IN_WINDOW = 5
BACKOFF_MAX_S = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)
    next_start: float = 0.0
    done: bool = False

    def start(self) -> None:
        now = time.monotonic()
        self.starts = [t for t in self.starts if now - t < RESTART_WINDOW_S] + [now]
        self.proc = subprocess.Popen(self.argv)
        log.info("started %s (pid %d)", self.name, self.proc.pid)


def stage_argv(config_path: Path | None, *stage: str) -> list[str]:
    argv = [sys.executable, "-m", "appliance", "stage", *stage]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv


def children_for(cfg: Config, config_path: Path | None) -> list[Child]:
    kids = [Child(f"capture-{c.name}", stage_argv(config_path, "capture", c.name))
            for c in cfg.capture]
    kids.append(Child("recorder", stage_argv(config_path, "recorder")))
    kids.append(Child("uplink", stage_argv(config_path, "uplink")))
    return kids


def supervise(cfg: Config, config_path: Path | None, stop: threading.Event) -> int:
    kids = children_for(cfg, config_path)
    for kid in kids:
        kid.start()
    try:
        while not stop.is_set():
            now = time.monotonic()
            for kid in kids:
                if kid.done or kid.proc is None:
                    if not kid.done and now >= kid.next_start:
                        kid.start()
                    continue
                code = kid.proc.poll()
                if code is None:
                    continue
                kid.proc = None
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
            stop.wait(0.2)
    finally:
        _stop_all(kids)
    return 0


def _stop_all(kids: list[Child], grace_s: float = 15.0) -> None:
    running = [k.proc for k in kids if k.proc is not None and k.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("pid %d did not stop in %.0f s: killing it", proc.pid, grace_s)
            proc.kill()
            proc.wait()


def die_with_parent() -> None:
    """Linux: a stage gets SIGTERM when its supervisor dies, so no orphan keeps a device open."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    # An orphan (its supervisor already gone) stops; a stage that systemd (PID 1) started as a
    # unit of its own has PID 1 as parent by design and runs.
    if os.getppid() == 1 and "INVOCATION_ID" not in os.environ:
        os.kill(os.getpid(), signal.SIGTERM)
