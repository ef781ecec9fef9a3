"""The HTTPS segment receiver: ``PUT /v1/<dev>/seg/<seq>`` with mutual TLS.

The second transport for segments (see docs/protocol.md, "HTTPS"). The client certificate's
common name is the device id, and a box may only PUT its own segments (403 otherwise). The body
is the sealed segment's wire form, at most ``MAX_SEGMENT_BYTES``. It goes through the same
:class:`~central.receiver.SegmentIntake` as the MQTT receiver: verified, stored (fsynced),
indexed, and only then answered with the same Ack JSON. A PUT is idempotent: the same segment
again answers ``duplicate``.

Status codes: 200 ``stored``/``duplicate``; 422 ``rejected`` (Ack in the body, quarantined);
400 bad request; 403 wrong device; 404 unknown path; 411/413 missing or oversize length;
503 central cannot write right now (retry later, nothing was acknowledged).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from central.home import Home
from central.index import IndexDbError
from central.receiver import SegmentIntake
from central.store import StoreError
from linerec_contract.protocol import HTTPS_PATH_RE, MAX_SEGMENT_BYTES, segment_topic
from linerec_contract.tls import tls_context

log = logging.getLogger("central.https")

IDLE_TIMEOUT_S = 120.0
RETRY_AFTER_S = 5


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context that requires a client certificate signed by ``ca``."""
    return tls_context(ssl.Purpose.CLIENT_AUTH, ca, cert, key, what="HTTPS")


def peer_common_name(sock: ssl.SSLSocket) -> str | None:
    cert: Any = sock.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return None


class _Handler(BaseHTTPRequestHandler):
    server: SegmentServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.request.settimeout(IDLE_TIMEOUT_S)
        # The TLS handshake runs here, in the request's own thread: a slow or hostile client
        # cannot hold up the accept loop.
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _answer(self, code: int, body: bytes, *, retry_after: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, *, retry_after: bool = False,
               close: bool = False) -> None:
        if close:
            self.close_connection = True
        self._answer(code, json.dumps({"v": 1, "error": message}).encode(),
                     retry_after=retry_after)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        match = HTTPS_PATH_RE.match(self.path)
        if match is None:
            self._error(404, f"path {self.path[:80]!r} is not /v1/<dev>/seg/<seq>", close=True)
            return
        dev, seq = match.group(1), int(match.group(2))
        cn = peer_common_name(self.request)
        if cn != dev:
            self._error(403, f"certificate CN {cn!r} may only PUT its own segments, "
                             f"not those of {dev!r}", close=True)
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self._error(411, "Content-Length (a non-negative integer) is required", close=True)
            return
        length = int(length_text)
        if not 0 < length <= MAX_SEGMENT_BYTES:
            self._error(413, f"segment of {length} bytes is outside 1..{MAX_SEGMENT_BYTES}",
                        close=True)
            return
        body = self.rfile.read(length)
        if len(body) != length:
            log.info("PUT %s: body cut after %d of %d bytes; dropped", self.path, len(body),
                     length)
            self.close_connection = True
            return
        self._store(dev, seq, body)

    def _store(self, dev: str, seq: int, body: bytes) -> None:
        intake = self.server.intake
        topic = segment_topic(dev, seq)
        try:
            outcome = intake.handle(topic, body)
        except (OSError, StoreError, IndexDbError) as err:
            log.error("cannot store %s/%d: %s; answered 503", dev, seq, err)
            self._error(503, f"central cannot store right now: {err}", retry_after=True)
            return
        except Exception as err:  # noqa: BLE001 - a bug must not stall the box behind it
            log.exception("unexpected error on %s/%d; rejecting it", dev, seq)
            fallback = intake._reject_after_bug(topic, body, err)
            if fallback is None:
                self._error(503, "internal error at central", retry_after=True)
                return
            outcome = fallback
        if outcome.ack is None:
            self._error(400, outcome.detail)
            return
        with self.server.counts_lock:
            intake.counts[outcome.ack.result] += 1
        log.info("PUT %s/%d %s", dev, seq, outcome.detail)
        self._answer(422 if outcome.ack.result == "rejected" else 200, outcome.ack.encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._error(405, "only PUT /v1/<dev>/seg/<seq> is served", close=True)

    do_POST = do_GET  # noqa: N815 - http.server's naming
    do_DELETE = do_GET  # noqa: N815


class SegmentServer(ThreadingHTTPServer):
    """A threaded HTTPS server for one central home."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, home: Home, *, host: str, port: int, ca: Path, cert: Path,
                 key: Path) -> None:
        self.intake = SegmentIntake(home)
        self.counts_lock = threading.Lock()
        self._tls = server_context(ca, cert, key)
        super().__init__((host, port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        return self._tls.wrap_socket(sock, server_side=True,
                                     do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-request (cut link, killed box) is routine here.
        log.info("connection from %s ended abnormally", client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                  daemon=True)
        thread.start()
        try:
            stop.wait()
        finally:
            self.shutdown()
            thread.join()
            self.server_close()
            self.intake.close()
