"""One instance per stage and state folder: an exclusive ``flock`` held for the process's life.

The lock files live in ``<state_dir>/locks/``; each holds the PID of its owner, so a second
instance can say which process to stop. The kernel drops the lock when its holder dies however
it dies, so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from linerec_contract.durable import ensure_dir
from linerec_contract.errors import StateDirError

_HELD: dict[str, int] = {}


def lock_dir(state_dir: Path) -> Path:
    return state_dir / "locks"


def acquire(state_dir: Path, name: str, what: str) -> Path:
    """Hold ``<state_dir>/locks/<name>.lock`` until the process exits.

    Raises StateDirError (exit 2, one line) naming the PID that holds it already.
    """
    path = lock_dir(state_dir) / f"{name}.lock"
    try:
        ensure_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise StateDirError(f"{what}: cannot create lock {path} ({err.strerror}); "
                            "state_dir must be a folder this user can write") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StateDirError(
            f"{what} already runs on state_dir {state_dir} (pid {holder} holds {path}); "
            "stop it first: one instance per state folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[name] = fd  # kept open (and locked) until exit
    return path


def _holder(fd: int) -> str:
    """The PID written by the holder (it writes it right after locking; wait briefly for it)."""
    import time

    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            text = os.pread(fd, 32, 0).decode().strip()
            if text:
                return str(int(text))
        time.sleep(0.01)
    return "unknown"


def release(name: str) -> None:
    fd = _HELD.pop(name, None)
    if fd is not None:
        os.close(fd)


def check_state_dir(state_dir: Path) -> None:
    """A state_dir that is not a writable folder is a configuration error (exit 2, one line)."""
    try:
        ensure_dir(state_dir)
    except OSError as err:
        raise StateDirError(
            f"paths.state_dir {state_dir}: cannot be used as a folder ({err.strerror}); "
            "accepted: a folder this user can write (it is created when missing)") from err
    probe = state_dir / f".write-test.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StateDirError(
            f"paths.state_dir {state_dir}: not writable ({err.strerror}); "
            "accepted: a folder this user can write") from err
