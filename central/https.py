"""The HTTPS segment receiver: ``PUT /v1/<dev>/seg/<seq>`` with mutual TLS.

The second transport for segments (see docs/protocol.md, "HTTPS", and docs/central-https.md).
Two processes, the deployment operators run for any TLS service facing many clients:

* **nginx** terminates TLS. It requires a client certificate signed by the fleet CA
  (``ssl_verify_client on``: a request without one is answered 400 by nginx and never reaches
  the application; a certificate from another CA fails the handshake), bounds
  connections (``worker_connections``), handshakes and headers (``client_header_timeout``), slow
  bodies (``client_body_timeout``), concurrent requests per box certificate (``limit_conn``)
  and body size (``client_max_body_size``), and streams each body to the application without
  buffering it (``proxy_request_buffering off``). It passes the verified identity in
  ``X-Client-Verify`` / ``X-Client-DN``, overwriting anything the client sent in those headers.
* **this application** (ASGI, served by uvicorn) listens only on a Unix socket in a folder of
  the central home that only the proxy's user can enter, so the identity headers can come only
  from the proxy. ASGI servers do not pass the client certificate to the application, which is
  why the certificate check lives in the proxy.

The application checks the certificate's common name against ``<dev>`` (a box may only PUT its
own segments, 403 otherwise), streams the body to a spool file (never whole in memory while it
arrives; the spool is bounded in total), then hands it to the same
:class:`~central.receiver.SegmentIntake` as the MQTT receiver, one segment at a time: verified,
stored, indexed, and only then answered with the same Ack JSON. A PUT is idempotent: the same
segment again answers ``duplicate``.

Status codes: 200 ``stored``/``duplicate``; 422 ``rejected`` (Ack in the body, quarantined);
400 bad request; 403 wrong device, no verified certificate or a box not enrolled; 404 unknown
path; 405 method;
411/413 missing or oversize length; 429 too many requests from one box (proxy); 503 central
cannot take it right now (``Retry-After``; nothing was acknowledged).

``appliance-central serve-https`` runs both: the application in this process and nginx as a
child process (stopped with it, also when this process is killed) from the configuration that
:func:`nginx_config` renders. ``serve-https --external-proxy`` runs only the application, for an
nginx the operator runs; ``https-proxy-config`` prints the matching nginx configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.home import Home, make_dirs
from central.index import IndexDbError
from central.receiver import Outcome, SegmentIntake
from central.store import StoreError
from linerec_contract.errors import ConfigError, DependencyError
from linerec_contract.protocol import DEVICE_ID_RE, MAX_SEGMENT_BYTES, segment_topic

log = logging.getLogger("central.https")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RETRY_AFTER_S = 5
# A refused request whose announced body is at most this long has its body read (and dropped)
# before the answer, so the connection from nginx is never closed under a body it is writing.
DRAIN_MAX_BYTES = 64 * 1024
# ASCII only: ``\d`` would take other scripts' digits ("٣") that int() accepts.
PATH_RE = re.compile(r"^/v1/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})/seg/([0-9]{1,12})$", re.ASCII)
SOCKET_NAME = "intake.sock"
RUN_DIR = "run/https"
SPOOL_DIR = "incoming-https"


# -- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpsLimits:
    """The ``[https]`` table of central.toml (all optional); see docs/central-https.md."""

    max_connections: int = 4096  # open TLS connections, authenticated or not
    per_device_requests: int = 2  # concurrent requests per box certificate
    header_timeout_s: int = 10  # TLS handshake + request headers
    body_timeout_s: int = 20  # longest pause between two pieces of a body
    keepalive_timeout_s: int = 75  # an idle authenticated connection
    spool_max_mb: int = 1024  # bodies being received or waiting, in total
    app_concurrency: int = 64  # requests inside the application at once


_LIMIT_RANGES: dict[str, tuple[int, int]] = {
    "max_connections": (16, 1_000_000),
    "per_device_requests": (1, 64),
    "header_timeout_s": (1, 300),
    "body_timeout_s": (1, 3600),
    "keepalive_timeout_s": (1, 3600),
    "spool_max_mb": (MAX_SEGMENT_BYTES >> 20, 1 << 20),
    "app_concurrency": (2, 4096),
}


def https_limits(config_path: Path) -> HttpsLimits:
    """The ``[https]`` table of ``config_path``, every key checked; defaults when absent."""
    if not config_path.exists():
        return HttpsLimits()
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{config_path}: cannot read: {err}") from err
    table = raw.get("https", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{config_path}: [https] must be a table")
    values: dict[str, int] = {}
    for key, value in table.items():
        if key not in _LIMIT_RANGES:
            raise ConfigError(f"{config_path}: unknown key https.{key} (accepted: "
                              f"{', '.join(sorted(_LIMIT_RANGES))})")
        low, high = _LIMIT_RANGES[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{config_path}: https.{key} must be an integer {low}..{high}, "
                              f"got {value!r}")
        values[key] = value
    return HttpsLimits(**values)


# -- identity from the proxy ---------------------------------------------------------------


def common_name_from_dn(dn: str) -> str | None:
    """The one CN of an RFC 2253 subject (as nginx's ``$ssl_client_s_dn``), or None.

    None when there is no CN, more than one, or one that is not a plain device id (escaped or
    multi-valued parts are never a device id).
    """
    names = []
    for part in re.split(r"(?<!\\),", dn):
        attr, sep, value = part.partition("=")
        if sep and attr.strip().upper() == "CN":
            names.append(value)
    if len(names) != 1 or not DEVICE_ID_RE.match(names[0]):
        return None
    return names[0]


# -- the application -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IntakeApp:
    """The ASGI application behind the proxy, for one central home."""

    def __init__(self, home: Home, limits: HttpsLimits | None = None) -> None:
        self.home = home
        self.limits = limits or https_limits(home.config_path)
        self.intake = SegmentIntake(home)
        # One spool folder per process: two intakes may share a home (a restart overlapping).
        spools = home.root / SPOOL_DIR
        make_dirs(spools)
        for folder in spools.iterdir():  # bodies of requests a dead intake never answered
            if not (folder.name.isdigit() and _alive(int(folder.name))):
                shutil.rmtree(folder, ignore_errors=True)
        self.spool = spools / str(os.getpid())
        make_dirs(self.spool)
        self.counts = {"answered": 0, "refused": 0, "spool_full": 0, "cut": 0}
        self._spooled = 0  # bytes reserved by bodies being received or waiting
        self._one_at_a_time: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # uvicorn runs with lifespan off; websockets are not served
        try:
            await self._request(scope, receive, send)
        except ConnectionError:
            self.counts["cut"] += 1

    async def _answer(self, send: Send, status: int, body: bytes, *,
                      retry_after: bool = False, close: bool = False) -> None:
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if retry_after:
            headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send: Send, status: int, message: str, **kw: bool) -> None:
        self.counts["refused"] += 1
        log.info("answered %d: %s", status, message)
        await self._answer(send, status, json.dumps({"v": 1, "error": message}).encode(), **kw)

    async def _refuse(self, receive: Receive, send: Send, headers: dict[bytes, bytes],
                      status: int, message: str, *, retry_after: bool = False) -> None:
        """Answer a request refused before its body was read.

        nginx streams the body to this application (``proxy_request_buffering off``); if the
        application answered and closed while nginx was still writing the body, nginx's write
        failed (EPIPE) and the box got 502 instead of the refusal. So a small announced body
        is read and dropped first and the connection kept; a larger one (or one of unknown
        length) is not read (it may be what overloads central) and the connection is closed.
        """
        announced = _announced_length(headers)
        drained = (announced is not None and announced <= DRAIN_MAX_BYTES
                   and await self._drain(receive, announced))
        await self._error(send, status, message, retry_after=retry_after, close=not drained)

    @staticmethod
    async def _drain(receive: Receive, length: int) -> bool:
        """Read and drop a body of ``length`` bytes; False when it was cut or longer."""
        got = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            got += len(message.get("body", b""))
            if got > length:
                return False
            if not message.get("more_body", False):
                return got == length

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(bytes(name).lower(), bytes(value))
        raw_path = bytes(scope.get("raw_path") or scope["path"].encode("utf-8", "replace"))
        path = raw_path.decode("ascii", "replace")
        if scope["method"] != "PUT":
            await self._refuse(receive, send, headers, 405, "only PUT /v1/<dev>/seg/<seq> is served")
            return
        match = PATH_RE.match(path)
        if match is None:
            await self._refuse(receive, send, headers, 404,
                               f"path {path[:80]!r} is not /v1/<dev>/seg/<seq> "
                               "(ASCII digits, seq 0..999999999999)")
            return
        dev, seq = match.group(1), int(match.group(2))
        verified = headers.get(b"x-client-verify", b"").decode("latin-1")
        cn = common_name_from_dn(headers.get(b"x-client-dn", b"").decode("latin-1"))
        if verified != "SUCCESS" or cn is None:
            await self._refuse(receive, send, headers, 403,
                               "no verified client certificate naming a device")
            return
        if cn != dev:
            await self._refuse(receive, send, headers, 403,
                               f"certificate CN {cn!r} may only PUT its own segments, "
                               f"not those of {dev!r}")
            return
        if b"transfer-encoding" in headers:
            await self._refuse(receive, send, headers, 411,
                               "Content-Length is required (no chunked bodies)")
            return
        length_text = headers.get(b"content-length", b"").decode("latin-1")
        if not length_text.isascii() or not length_text.isdigit():
            await self._refuse(receive, send, headers, 411,
                               "Content-Length (a non-negative integer) is required")
            return
        length = int(length_text)
        if not 0 < length <= MAX_SEGMENT_BYTES:
            await self._refuse(receive, send, headers, 413, f"segment of {length} bytes is outside "
                                                         f"1..{MAX_SEGMENT_BYTES}")
            return
        if self._spooled + length > self.limits.spool_max_mb << 20:
            self.counts["spool_full"] += 1
            await self._refuse(receive, send, headers, 503,
                               "central is receiving too much at once; retry later",
                               retry_after=True)
            return
        self._spooled += length
        body = self.spool / f"{dev}-{seq}-{uuid.uuid4().hex[:12]}.body"
        try:
            if not await self._receive_body(receive, body, length):
                self.counts["cut"] += 1
                log.info("PUT %s/%d: body cut or longer than announced; dropped", dev, seq)
                return
            outcome = await self._store(dev, seq, body)
        finally:
            body.unlink(missing_ok=True)
            self._spooled -= length
        await self._send_outcome(send, dev, seq, outcome)

    async def _receive_body(self, receive: Receive, path: Path, length: int) -> bool:
        """Write the body to ``path`` as it arrives; False when it was cut or too long."""
        got = 0
        # Not fsynced: nothing is acknowledged before the store has the segment durably.
        with path.open("wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                chunk = message.get("body", b"")
                got += len(chunk)
                if got > length:
                    return False
                fh.write(chunk)
                if not message.get("more_body", False):
                    return got == length

    async def _store(self, dev: str, seq: int, body: Path) -> Outcome | Exception:
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Semaphore(1)
        # One segment verified and stored at a time, whatever the number of uploads in flight.
        async with self._one_at_a_time:
            return await asyncio.get_running_loop().run_in_executor(
                None, self._store_sync, dev, seq, body)

    def _store_sync(self, dev: str, seq: int, body: Path) -> Outcome | Exception:
        topic = segment_topic(dev, seq)
        try:
            # The body stays on disk: its payload is hashed and stored block by block.
            return self.intake.handle(topic, body)
        except (OSError, StoreError, IndexDbError) as err:
            log.error("cannot store %s/%d: %s; answered 503", dev, seq, err)
            return err
        except Exception as err:  # noqa: BLE001 - a bug must not stall the box behind it
            log.exception("unexpected error on %s/%d; rejecting it", dev, seq)
            fallback = self.intake._reject_after_bug(topic, body, err)
            return err if fallback is None else fallback

    async def _send_outcome(self, send: Send, dev: str, seq: int,
                            outcome: Outcome | Exception) -> None:
        if isinstance(outcome, Exception):
            await self._error(send, 503, f"central cannot store right now: {outcome}",
                              retry_after=True)
            return
        if outcome.ack is None:
            # A box that is not enrolled is refused (never quarantined): 403, as for a
            # certificate naming another device; anything else refused is a bad request.
            status = 403 if outcome.refused == "not_enrolled" else 400
            await self._error(send, status, outcome.detail)
            return
        self.intake.counts[outcome.ack.result] += 1
        self.counts["answered"] += 1
        log.info("PUT %s/%d %s", dev, seq, outcome.detail)
        await self._answer(send, 422 if outcome.ack.result == "rejected" else 200,
                           outcome.ack.encode())


def _announced_length(headers: dict[bytes, bytes]) -> int | None:
    """The body length a request announces: 0 without Content-Length (and not chunked), None
    when it is chunked or its Content-Length is not a number."""
    if b"transfer-encoding" in headers:
        return None
    text = headers.get(b"content-length", b"0").decode("latin-1")
    return int(text) if text.isascii() and text.isdigit() else None


# -- the proxy -----------------------------------------------------------------------------

NGINX_TEMPLATE = """\
# nginx in front of appliance-central's HTTPS intake (docs/central-https.md).
# Rendered by appliance-central; the same text serves as a site for a system nginx.
{main}
events {{
    worker_connections {max_connections};
}}

http {{
    server_tokens off;
    access_log {access_log};
    {temp_paths}
    # Bounds against a box (every box has a fleet certificate) or anyone else on the network.
    client_header_timeout {header_timeout_s}s;  # TLS handshake and request headers
    client_body_timeout {body_timeout_s}s;      # longest pause inside a body
    send_timeout 30s;
    keepalive_timeout {keepalive_timeout_s}s;
    keepalive_requests 100000;
    client_max_body_size {max_body};
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    limit_conn_zone $ssl_client_s_dn zone=per_device:4m;
    limit_conn_status 429;
    limit_conn_log_level warn;

    upstream appliance_central_intake {{
        server unix:{socket};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {ca};
        ssl_verify_client on;   # without a fleet certificate nothing reaches the intake
        ssl_verify_depth 2;

        location / {{
            limit_conn per_device {per_device_requests};
            proxy_pass http://appliance_central_intake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # The verified identity; replaces whatever the client sent in these headers.
            proxy_set_header X-Client-Verify $ssl_client_verify;
            proxy_set_header X-Client-DN $ssl_client_s_dn;
            proxy_request_buffering off;   # stream bodies; never whole in the proxy
            proxy_read_timeout 300s;       # storing (fsync, S3) may take a while
            proxy_next_upstream off;
        }}
    }}
}}
"""


def nginx_config(*, listen: str, ca: Path, cert: Path, key: Path, socket_path: Path,
                 limits: HttpsLimits, prefix: Path | None = None, user: str | None = None,
                 access_log: str = "off") -> str:
    """The nginx configuration for the intake. With ``prefix`` it is a whole nginx.conf for a
    private nginx (pid, temp folders, one worker); without, the ``http`` part is what a site
    file of a system nginx needs (drop the events block there)."""
    main = ""
    temp_paths = ""
    if prefix is not None:
        main = (f"worker_processes 1;\nworker_rlimit_nofile {limits.max_connections * 2 + 64};\n"
                f"pid {prefix / 'nginx.pid'};\ndaemon off;\n"
                f"error_log {prefix / 'error.log'} warn;\n")
        if user is not None:
            main += f"user {user};\n"
        temp_paths = " ".join(
            f"{kind}_temp_path {prefix / 'tmp' / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return NGINX_TEMPLATE.format(
        main=main, temp_paths=temp_paths, access_log=access_log, listen=listen, ca=ca,
        cert=cert, key=key, socket=socket_path, max_body=MAX_SEGMENT_BYTES,
        **{k: getattr(limits, k) for k in ("max_connections", "header_timeout_s",
                                          "body_timeout_s", "keepalive_timeout_s",
                                          "per_device_requests")},
    )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a killed intake takes its proxy along


def find_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file()
                                      else None)
    if found is None:
        raise DependencyError("nginx is not installed (apt-get install nginx); it terminates "
                              "the HTTPS intake's mutual TLS")
    return found


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.bind((host, port))
            break
        except OSError as err:
            # A proxy of a killed intake may still be letting go of the port.
            if port == 0 or time.monotonic() > deadline:
                sock.close()
                raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}") from err
            time.sleep(0.2)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class SegmentServer:
    """The HTTPS intake of one central home: the application plus (unless ``external_proxy``)
    a private nginx on ``host:port`` that terminates mutual TLS."""

    def __init__(self, home: Home, *, host: str, port: int, ca: Path | None, cert: Path | None,
                 key: Path | None, external_proxy: bool = False,
                 socket_path: Path | None = None) -> None:
        self.home = home
        self.limits = https_limits(home.config_path)
        self.app = IntakeApp(home, self.limits)
        self.intake = self.app.intake
        self.run_dir = home.root / RUN_DIR
        make_dirs(self.run_dir.parent)
        make_dirs(self.run_dir)
        # Only this user (and so the proxy it starts) may reach the socket: the identity
        # headers are believed because nobody else can connect.
        os.chmod(self.run_dir, 0o700 if socket_path is None else 0o750)
        self.socket_path = socket_path or self.run_dir / SOCKET_NAME
        self.external_proxy = external_proxy
        self._listener: socket.socket | None = None
        self._proxy: subprocess.Popen[bytes] | None = None
        self.host = host
        self.port = port
        if not external_proxy:
            if ca is None or cert is None or key is None:
                raise ConfigError("serve-https needs --ca, --cert and --key (or --external-proxy)")
            self._nginx = find_nginx()
            self._listener = _bind(host, port)
            self.port = int(self._listener.getsockname()[1])
            prefix = self.run_dir / "nginx"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                make_dirs(prefix / "tmp" / kind)
            user = pwd.getpwuid(home.root.stat().st_uid).pw_name if os.geteuid() == 0 else None
            listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
            self.proxy_config = prefix / "nginx.conf"
            self.proxy_config.write_text(nginx_config(
                listen=listen, ca=ca.resolve(), cert=cert.resolve(), key=key.resolve(),
                socket_path=self.socket_path, limits=self.limits, prefix=prefix, user=user))
            self._prefix = prefix
        import uvicorn

        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, uds=str(self.socket_path), lifespan="off", access_log=False,
            log_config=None, limit_concurrency=self.limits.app_concurrency,
            timeout_keep_alive=self.limits.keepalive_timeout_s + 5,
            h11_max_incomplete_event_size=16 * 1024, ws="none", http="h11",
        ))

    def _start_proxy(self) -> None:
        assert self._listener is not None  # noqa: S101 - only with our own proxy
        fd = self._listener.fileno()
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"), "NGINX": f"{fd};"}
        self._proxy = subprocess.Popen(  # noqa: PLW1509 - preexec only sets PDEATHSIG
            [self._nginx, "-p", str(self._prefix), "-c", str(self.proxy_config),
             "-e", str(self._prefix / "error.log")],
            env=env, pass_fds=(fd,), preexec_fn=_die_with_parent,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while not (self._prefix / "nginx.pid").exists():
            if self._proxy.poll() is not None or time.monotonic() > deadline:
                err = self._proxy.stderr.read().decode(errors="replace") if self._proxy.stderr \
                    else ""
                log_tail = (self._prefix / "error.log").read_text(errors="replace")[-500:] \
                    if (self._prefix / "error.log").exists() else ""
                raise ConfigError(f"nginx did not start: {' '.join((err + log_tail).split())}")
            time.sleep(0.05)
        log.info("nginx (pid %d) terminates TLS on %s:%d", self._proxy.pid, self.host, self.port)

    def _stop_proxy(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is None:
            return
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGQUIT)  # graceful: answers in progress are finished
            try:
                proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        if proxy.stderr is not None:
            proxy.stderr.close()

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` is set; ``on_ready`` is called once requests are taken."""
        thread = threading.Thread(target=lambda: asyncio.run(self._uvicorn.serve()),
                                  name="https-intake", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 15
            while not self._uvicorn.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise ConfigError(f"the intake could not listen on {self.socket_path}")
                time.sleep(0.02)
            if not self.external_proxy:
                self._start_proxy()
            if on_ready is not None:
                on_ready()
            while not stop.wait(0.5):
                if self._proxy is not None and self._proxy.poll() is not None:
                    log.error("nginx exited (%s); restarting it", self._proxy.returncode)
                    self._stop_proxy()
                    self._start_proxy()
        finally:
            self._stop_proxy()
            self._uvicorn.should_exit = True
            thread.join(timeout=30)
            if self._listener is not None:
                self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self.intake.close()
