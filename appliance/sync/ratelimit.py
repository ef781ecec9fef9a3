"""Upload bandwidth cap: a token bucket shared by the MQTT and HTTPS uplinks.

Tokens are bytes, refilled at ``max_kbps`` kilobits per second up to a burst of one second's
worth (at least one chunk). A send may take the bucket into debt; the next send then waits until
the debt is repaid, so the long-run rate is the cap while any message size works. ``max_kbps``
0 means unlimited.
"""

from __future__ import annotations

import threading
import time


class TokenBucket:
    def __init__(self, max_kbps: float, *, burst_bytes: int = 0) -> None:
        if max_kbps < 0:
            raise ValueError(f"max_kbps {max_kbps!r} is invalid (>= 0; 0 = unlimited)")
        self.rate = max_kbps * 1000.0 / 8.0  # bytes per second
        self.burst = max(float(burst_bytes), self.rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self) -> float:
        """Seconds until a send may start (0 when the bucket is out of debt)."""
        if self.unlimited:
            return 0.0
        with self._lock:
            self._refill(time.monotonic())
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take(self, nbytes: int) -> None:
        """Account for ``nbytes`` sent (may go into debt)."""
        if self.unlimited:
            return
        with self._lock:
            self._refill(time.monotonic())
            self._tokens -= nbytes

    def consume(self, nbytes: int, stop: threading.Event) -> bool:
        """Block until the bucket allows a send, then take ``nbytes``; False if ``stop`` is set."""
        while True:
            delay = self.wait_time()
            if delay <= 0:
                self.take(nbytes)
                return True
            if stop.wait(delay):
                return False
