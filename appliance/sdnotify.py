"""sd_notify keep-alives: ``READY=1`` once a stage's loop runs, ``WATCHDOG=1`` from inside it.

The protocol is systemd's: datagrams to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path,
or ``@name`` for the abstract namespace), a keep-alive due every ``WATCHDOG_USEC`` microseconds.
``appliance run`` speaks the same protocol to its children, so a stage behaves identically
under systemd and under the built-in supervisor.

Keep-alives are sent from the stage's main loop only, never from a side thread: a capture
stuck in the driver or a recorder stuck in analysis stops sending them and gets restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def socket_address(name: str) -> str:
    """The address ``NOTIFY_SOCKET`` names (a leading ``@`` is the abstract namespace)."""
    return "\0" + name[1:] if name.startswith("@") else name


class Notifier:
    """Sends ``READY=1`` on the first :meth:`watchdog` call, then ``WATCHDOG=1`` at half the
    watchdog interval. Without ``NOTIFY_SOCKET`` every call is a cheap no-op."""

    def __init__(self, socket_name: str | None, watchdog_usec: int | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.socket_name = socket_name or None
        self.interval_s = watchdog_usec / 2e6 if watchdog_usec else None
        """Seconds between keep-alives (half of the watchdog timeout), None = no watchdog."""
        self._clock = clock
        self._ready = False
        self._last = 0.0
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    def notify(self, message: str) -> None:
        """Send one datagram; a missing or full socket is logged once, never raised."""
        if self.socket_name is None or self._failed:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), socket_address(self.socket_name))
        except OSError as err:
            # The manager is gone or overloaded: it will act on the missing keep-alives.
            log.warning("sd_notify %s: %s (keep-alives stop)", self.socket_name, err.strerror)
            self._failed = True

    def watchdog(self) -> None:
        """Call on every turn of the main loop: READY=1 once, then WATCHDOG=1 when due."""
        if self.socket_name is None:
            return
        if not self._ready:
            self._ready = True
            self.notify("READY=1")
            self._last = self._clock()
            return
        if self.interval_s is None:
            return
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def max_wait(self, wanted: float) -> float:
        """``wanted`` capped so that a loop sleeping this long still sends its keep-alives."""
        if self.interval_s is None or self.socket_name is None:
            return wanted
        return max(0.0, min(wanted, self.interval_s / 2))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_NOTIFIER: Notifier | None = None


def notifier() -> Notifier:
    """The process's notifier, configured from the environment on first use."""
    global _NOTIFIER  # one notifier per process
    if _NOTIFIER is None:
        _NOTIFIER = Notifier.from_environ()
    return _NOTIFIER
