"""Stages under a service manager: READY=1 once their loop runs, WATCHDOG=1 from inside it.

Each stage runs re-parented, as under systemd (the process that started it is gone, so its
parent is PID 1 or a subreaper), with NOTIFY_SOCKET naming a datagram socket this test reads.
A capture stage whose device read blocks (an ALSA file-backed PCM reading a FIFO nobody feeds:
the read waits inside libasound, as a read stuck in a driver does) stops sending WATCHDOG=1 and
resumes when audio flows again. ``appliance run`` reads the same keep-alives and restarts a
stage that stops sending them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.sdnotify import Notifier
from linerec_contract.pki import ensure_pki
from tests.box.support import RECIPIENT, descendants, reap_leftovers, sim_config, wait_for

INTERVAL_USEC = 400_000  # keep-alive due every 0.4 s: the stage sends one every 0.2 s
RATE = 8000

ASOUND_CONF = """
pcm.fifocap {{
  type file
  slave.pcm {{ type null }}
  file "/dev/null"
  infile "{fifo}"
  format "raw"
}}
"""


class NotifyListener:
    """A datagram socket in the abstract namespace, as systemd's NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.name = f"@appliance-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[tuple[float, str]] = []

    def collect(self, until: object, bound_s: float) -> list[str]:
        """Receive until ``until(messages)`` holds or ``bound_s`` passes."""
        deadline = time.monotonic() + bound_s
        while not until(self.texts()) and time.monotonic() < deadline:  # type: ignore[operator]
            self.sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))
        return self.texts()

    def texts(self) -> list[str]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


def launch_orphan(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start ``argv`` through an intermediate process that exits at once: its parent is gone."""
    starter = ("import subprocess, sys\n"
               "with open(sys.argv[1], 'ab') as log:\n"
               "    p = subprocess.Popen(sys.argv[2:], stdout=log, stderr=log,"
               " stdin=subprocess.DEVNULL, start_new_session=True)\n"
               "print(p.pid)\n")
    out = subprocess.run([sys.executable, "-c", starter, str(log), *argv], env=env, check=True,
                         capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip())


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


@pytest.fixture
def orphans() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stage_env(listener: NotifyListener, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(NOTIFY_SOCKET=listener.name, WATCHDOG_USEC=str(INTERVAL_USEC), **extra)
    env.pop("WATCHDOG_PID", None)
    return env


def count(texts: list[str], what: str) -> int:
    return sum(1 for t in texts if t == what)


def assert_ready_then_keepalives(listener: NotifyListener, launched: float, wanted: int) -> None:
    texts = listener.collect(lambda t: count(t, "WATCHDOG=1") >= wanted, 60)
    assert texts and texts[0] == "READY=1", texts
    assert count(texts, "READY=1") == 1, texts
    assert count(texts, "WATCHDOG=1") >= wanted, texts
    # Every half interval, never faster: the stage cannot have sent more keep-alives than
    # half-intervals fit between its launch and the last one received (a count, not a timing).
    span = listener.messages[-1][0] - launched
    assert count(texts, "WATCHDOG=1") <= span / (INTERVAL_USEC / 2e6) + 1, (span, texts)


@pytest.mark.parametrize("stage", ["capture", "recorder", "uplink-none", "uplink-mqtt",
                                   "uplink-https"])
def test_stage_reparented_sends_ready_then_keepalives(
        tmp_path: Path, orphans: list[int], stage: str) -> None:
    transport = stage.removeprefix("uplink-") if stage.startswith("uplink-") else "none"
    cfg = sim_config(tmp_path, transport=transport,
                     extra='https_url = "https://127.0.0.1:1"\n' if transport == "https" else "")
    if transport != "none":  # nothing listens on port 1: the loop keeps reconnecting
        pki = ensure_pki(tmp_path / "pki", ["test-box"])
        for src, name in ((pki.ca_cert, "ca.pem"), (pki.client_cert("test-box"), "client.pem"),
                          (pki.client_key("test-box"), "client.key")):
            shutil.copy(src, tmp_path / name)
    listener = NotifyListener()
    try:
        argv = [sys.executable, "-m", "appliance", "stage", stage.split("-")[0],
                "--config", str(cfg)]
        launched = time.monotonic()
        pid = launch_orphan(argv, stage_env(listener), tmp_path / "stage.log")
        orphans.append(pid)
        assert parent_of(pid) != os.getpid()  # re-parented: its starter is gone
        assert_ready_then_keepalives(listener, launched, wanted=4)
        # Still running: under the old PID-1 heuristic a stage killed itself here.
        os.kill(pid, 0)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists()
                 or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3],
                 30, "the stage to stop on SIGTERM")
    finally:
        listener.close()
    log = (tmp_path / "stage.log").read_text()
    assert "Traceback" not in log, log


def alsa_fifo_config(folder: Path) -> tuple[Path, Path, Path]:
    fifo = folder / "line.fifo"
    os.mkfifo(fifo)
    conf = folder / "asound.conf"
    conf.write_text(ASOUND_CONF.format(fifo=fifo))
    cfg = folder / "appliance.toml"
    cfg.write_text(f"""[paths]
state_dir = "{folder / 'state'}"

[[capture]]
name = "main"
source = "alsa"
device = "fifocap"
channels = 1
rate = {RATE}
sample_format = "S16_LE"
rt_priority = 0

[ring]
size_mb = 2

[seal]
recipients = ["{RECIPIENT}"]

[uplink]
transport = "none"

[health]
watchdog_s = 1.0
""")
    return fifo, conf, cfg


def feed(fd: int, seconds: float) -> None:
    """Write ``seconds`` of quiet audio into the FIFO, paced like a device."""
    chunk = b"\x01\x00" * (RATE // 20)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(fd, chunk)
        time.sleep(0.05)


def feed_until(fd: int, listener: NotifyListener, done: object, bound_s: float = 60) -> None:
    """Feed the FIFO like a device while collecting notifications, until ``done()``."""
    deadline = time.monotonic() + bound_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, listener.texts()
        feed(fd, 0.1)
        listener.collect(lambda t: False, 0.05)


def test_capture_blocked_in_the_device_stops_keepalives(tmp_path: Path,
                                                         orphans: list[int]) -> None:
    fifo, conf, cfg = alsa_fifo_config(tmp_path)
    # Held open read-write: the stage's open never waits, and its reads block once it is empty.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    listener = NotifyListener()
    try:
        env = stage_env(listener, ALSA_CONFIG_PATH=str(conf))
        pid = launch_orphan([sys.executable, "-m", "appliance", "stage", "capture",
                             "--config", str(cfg)], env, tmp_path / "stage.log")
        orphans.append(pid)
        feed(fd, 0.5)
        listener.collect(lambda t: t[:1] == ["READY=1"], 60)
        feed_until(fd, listener, lambda: count(listener.texts(), "WATCHDOG=1") >= 3)
        assert listener.texts()[0] == "READY=1"
        # Starve it: the loop now waits inside the device read. Once what was buffered is
        # consumed, a whole window of 8 keep-alive intervals passes without one.
        window = 8 * INTERVAL_USEC / 1e6
        deadline = time.monotonic() + 60
        while True:
            before = count(listener.texts(), "WATCHDOG=1")
            listener.collect(lambda t: False, window)
            if count(listener.texts(), "WATCHDOG=1") == before:
                break
            assert time.monotonic() < deadline, "keep-alives never stopped while starved"
        assert Path(f"/proc/{pid}").exists()  # blocked, not dead
        # Audio flows again: so do the keep-alives.
        feed_until(fd, listener, lambda: count(listener.texts(), "WATCHDOG=1") >= before + 3)
    finally:
        listener.close()
        os.close(fd)


def test_run_restarts_a_stage_that_stops_keepalives(tmp_path: Path) -> None:
    fifo, conf, cfg = alsa_fifo_config(tmp_path)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    env = dict(os.environ, ALSA_CONFIG_PATH=str(conf))
    log_path = tmp_path / "run.log"
    with log_path.open("ab") as log:
        run = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(cfg)],
                               env=env, stdout=log, stderr=log)
    tree: set[int] = set()
    try:
        first = re.compile(r"started capture-main \(pid (\d+)\)")
        wait_for(lambda: first.search(log_path.read_text()), 60, "capture to start")
        pid1 = int(first.findall(log_path.read_text())[0])
        # Fed long enough to be running and sending keep-alives, then starved.
        feed(fd, 3.0)
        killed = re.compile(r"capture-main \(pid (\d+)\) sent no keep-alive")
        wait_for(lambda: killed.search(log_path.read_text()), 60, "the supervisor to act")
        assert int(killed.findall(log_path.read_text())[0]) == pid1
        wait_for(lambda: len(first.findall(log_path.read_text())) >= 2, 60, "a restart")
        pid2 = int(first.findall(log_path.read_text())[1])
        assert pid2 != pid1
        assert not Path(f"/proc/{pid1}").exists() or parent_of(pid1) != run.pid
        tree = descendants(run.pid)
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
        reap_leftovers(tree)
        os.close(fd)
    assert "Traceback" not in log_path.read_text()


def test_notifier_without_socket_is_silent_and_cheap() -> None:
    n = Notifier(None, 1_000_000)
    n.watchdog()
    assert not n.enabled


def test_notifier_ignores_a_watchdog_meant_for_another_process() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(env).interval_s is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier.from_environ(env).interval_s == 0.5


def test_sim_config_is_usable(tmp_path: Path) -> None:
    # The helper config must load: otherwise every stage test above fails for the wrong reason.
    from appliance.config import load_config

    assert load_config(sim_config(tmp_path)).uplink.transport == "none"
