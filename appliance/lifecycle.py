"""Restart and reboot requests from the uplink to the box's supervisor, without privilege.

The stages run as the unprivileged user ``appliance`` with ``NoNewPrivileges``, so the uplink
cannot call ``systemctl restart`` or ``reboot`` itself. It asks instead: it writes a request
file ``<state_dir>/fleet/requests/<action>`` (content: the boot id it was written in) and the
box's supervisor acts on it:

- under systemd, the OS image's path units (root) watch the folder:
  ``appliance-restart.path`` restarts ``appliance.target`` (every stage),
  ``appliance-restart-stages.path`` restarts the capture and recorder units (a pushed config),
  ``appliance-reboot.path`` reboots the machine, only when the request was written in the
  current boot (a request left by a power cut never reboots the box twice);
- under ``appliance run`` (no systemd), the supervisor polls the folder and restarts the stages
  itself; it cannot reboot the machine, so the agent refuses ``reboot`` there with the reason.

Each request file is removed by whoever acts on it before acting, so it is done once. The only
right the ``appliance`` user gains is asking for these three actions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from linerec_contract.durable import atomic_write, ensure_dir

Action = Literal["restart", "restart-stages", "reboot"]
ACTIONS: tuple[Action, ...] = ("restart", "restart-stages", "reboot")
SUPERVISOR_ENV = "APPLIANCE_SUPERVISOR"  # set to "run" by appliance run for its children
Supervisor = Literal["systemd", "run"]


def requests_dir(state_dir: Path) -> Path:
    return state_dir / "fleet" / "requests"


def supervisor() -> Supervisor | None:
    """Who supervises this process: ``appliance run``, systemd, or nobody (a stage started by
    hand, a test)."""
    if os.environ.get(SUPERVISOR_ENV) == "run":
        return "run"
    if os.environ.get("INVOCATION_ID"):
        return "systemd"
    return None


def request(state_dir: Path, action: Action, boot_id: str) -> Path:
    """Ask the supervisor for ``action``; returns the request file."""
    folder = requests_dir(state_dir)
    ensure_dir(folder)
    path = folder / action
    # Durability: atomic (the path unit never sees half a file); fsynced by atomic_write, though
    # a power cut restarts everything anyway.
    atomic_write(path, f"{boot_id}\n".encode(), mode=0o640)
    return path


def take(state_dir: Path) -> list[Action]:
    """The actions requested, each request removed (for ``appliance run``)."""
    folder = requests_dir(state_dir)
    taken: list[Action] = []
    for action in ACTIONS:
        try:
            (folder / action).unlink()
        except FileNotFoundError:
            continue
        taken.append(action)
    return taken
