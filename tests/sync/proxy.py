"""A TCP proxy under a test's control: cut connections at a byte offset, pause, throttle.

Threaded and small on purpose. Each accepted connection gets its own upstream connection and
two pump threads. ``cut_at_random_offsets`` arms every live connection with a random byte
budget: once that many more bytes have crossed (either direction), both sockets are reset
(RST), as a dropped NAT entry or a dying access link would. ``rate_bps`` throttles the
client-to-server direction (the box's upload) with a token bucket.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.budget: int | None = None
        self.lock = threading.Lock()
        self.dead = False

    def kill(self) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = True
        _reset(self.client)
        _reset(self.server)


class Proxy:
    def __init__(self, target_host: str, target_port: int, *, rate_bps: float = 0) -> None:
        self.target = (target_host, target_port)
        self.rate_bps = rate_bps
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._bucket_lock = threading.Lock()
        self.connections = 0
        self.cuts = 0
        self.upstream_bytes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    # -- control -----------------------------------------------------------------------------

    def cut_at_random_offsets(self, rng: random.Random, max_offset: int = 64 * 1024) -> int:
        """Arm every live connection to die after a random number of further bytes."""
        with self._lock:
            live = [c for c in self._conns if not c.dead]
        for conn in live:
            with conn.lock:
                conn.budget = rng.randint(1, max_offset)
        return len(live)

    def cut_now(self) -> None:
        with self._lock:
            live = [c for c in self._conns if not c.dead]
        for conn in live:
            conn.kill()

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._open.set()
        self.cut_now()

    # -- plumbing ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, server)
            with self._lock:
                self._conns = [c for c in self._conns if not c.dead] + [conn]
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn, client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, server, client, False),
                             daemon=True).start()

    def _throttle(self, nbytes: int) -> None:
        if self.rate_bps <= 0:
            return
        with self._bucket_lock:
            now = time.monotonic()
            self._tokens = min(self.rate_bps / 20, self._tokens + (now - self._stamp)
                               * self.rate_bps)
            self._stamp = now
            self._tokens -= nbytes
            debt = -self._tokens / self.rate_bps if self._tokens < 0 else 0.0
        if debt > 0:
            time.sleep(debt)

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while not conn.dead:
                self._open.wait()
                data = src.recv(16384 if self.rate_bps else 65536)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if upstream:
                    self._throttle(len(data))
                with conn.lock:
                    budget = conn.budget
                    if budget is not None:
                        conn.budget = budget - len(data)
                if budget is not None and len(data) >= budget:
                    with contextlib.suppress(OSError):
                        dst.sendall(data[:budget])
                    with self._lock:
                        self.cuts += 1
                    conn.kill()
                    return
                dst.sendall(data)
                if upstream:
                    self.upstream_bytes += len(data)
        except OSError:
            conn.kill()
