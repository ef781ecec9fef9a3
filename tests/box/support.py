"""Helpers for the box-level tests: process trees from /proc, configs, the appliance CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RECIPIENT = "age1" + "q" * 58  # syntactically valid; nothing in these tests decrypts


def appliance(*args: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":  # a zombie is dead already
                out[int(entry)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    ppids = _ppids()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        kids = {p for p, pp in ppids.items() if pp in frontier and p not in found}
        found |= kids
        frontier = kids
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    live = _ppids()
    return {p for p in pids if p in live}


def wait_gone(pids: set[int], bound_s: float) -> set[int]:
    """Poll until none of ``pids`` runs or ``bound_s`` passed; return the survivors."""
    deadline = time.monotonic() + bound_s
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(pids)
    return left


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it at once: stop them all first, so that none
    reacts (to the parent's death signal, say) before the kill lands."""
    tree = descendants(pid) | {pid}
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    for p in descendants(pid) - tree:  # started while we were stopping the others
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
            tree.add(p)
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def reap_leftovers(pids: set[int]) -> None:
    for p in alive(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def sim_config(folder: Path, *, transport: str = "none", extra: str = "") -> Path:
    """A box that records simulated lines into ``folder/state`` (runs forever, live pace)."""
    cfg = folder / "appliance.toml"
    cfg.write_text(f"""[device]
id = "test-box"

[paths]
state_dir = "{folder / 'state'}"

[[capture]]
name = "main"
source = "simulator"
sim_lines = 2
realtime = true

[ring]
size_mb = 4

[seal]
recipients = ["{RECIPIENT}"]

[uplink]
transport = "{transport}"
host = "127.0.0.1"
port = 1
ca = "{folder / 'ca.pem'}"
cert = "{folder / 'client.pem'}"
key = "{folder / 'client.key'}"
{extra}""")
    return cfg


def wait_for(predicate: object, bound_s: float, what: str) -> None:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
