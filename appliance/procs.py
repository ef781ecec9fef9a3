"""Ownership of child processes: whatever the box starts dies with the process that started it.

Each child gets ``PR_SET_PDEATHSIG`` (SIGTERM: it stops the way it would on ``systemctl stop``)
before it executes, set in the child between fork and exec; if the parent died before that
point the child exits at once, so there is no window in which an orphan survives. Each child
runs in a process group of its own, removed as a whole on a normal stop so that nothing it
started (an encoder, an ``age`` process) outlives it either.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1

_libc: Any = None


def _prctl() -> Any:
    global _libc  # loaded once, before any fork
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when the parent dies; exit if it is already gone.

    Nothing here depends on who the parent is: under systemd (parent PID 1) a stage is simply
    never signalled this way.
    """
    libc = _prctl()
    if libc is None:
        return
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died between fork and prctl


def owned_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that ties the child's life to this process (see :func:`die_with_parent`)."""
    parent = os.getpid()
    _prctl()  # load libc in the parent: nothing is loaded between fork and exec

    def preexec() -> None:
        die_with_parent(parent, sig)

    return preexec


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` owned by this process, in a process group (and session) of its own."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(argv, preexec_fn=owned_preexec(), **kwargs)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of ``proc``'s process group (its own group: see :func:`spawn`)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; always removes the whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_group(proc)
    return int(proc.returncode)
