"""The fleet broker: the shipped mosquitto configuration, and a private broker run from it.

The configuration ships with the package in ``linerec_contract/broker_conf/``: ``mosquitto.conf.in``
(mutual TLS; certificate CN = user name = client id; CRL), ``mosquitto.acl`` (each box confined
to its own subtree) and ``fleet_acl.c``, a small mosquitto plugin that refuses subscriptions a
box has no business making (anything outside its subtree, every ``$share/...`` filter).
:func:`linerec_contract.broker_config.render_config` fills in paths and port; the demo, the tests
and the OS image all use it.

Both layers of the broker's security complement each other. The plugin refuses every
``$share/...`` subscription by a box, so no box can join central's shared group; the group name
is nonetheless a secret of the central home (``keys/share-group``, see docs/protocol.md), so a
broker run without the plugin still keeps boxes out of the receivers' group. Each receiver has
a certificate of its own (``central_users``; every ``central-*`` CN has central's rights too, and
the fleet CA never issues a box such a CN) and, with ``use_username_as_clientid``, its own
session. ``max_packet_size`` bounds every message at one chunk plus headers.

:class:`Broker` runs one mosquitto from that configuration for tests, the embedded demo and lab
setups, listening on loopback. Persistence is on, so QoS 1 messages queued for persistent
sessions survive a graceful restart (and, up to the autosave interval, a SIGKILL).

Everything the broker writes (config, ACL, database, log) stays in ``workdir``; the compiled
plugin is cached per user (``$XDG_CACHE_HOME/line-recorder``), keyed by its source's hash.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType

from appliance.procs import owned_preexec
from linerec_contract.broker_config import CENTRAL_PREFIX, plugin_path, render_acl, render_config
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ApplianceError, DependencyError
from linerec_contract.pki import Pki, ensure_crl

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
AUTOSAVE_INTERVAL_S = 5
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class BrokerError(ApplianceError):
    """The private broker could not be started or stopped."""


def find_mosquitto() -> str:
    """The mosquitto binary, looked up on PATH and in the sbin folders (often not on PATH)."""
    override = os.environ.get("APPLIANCE_MOSQUITTO")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise DependencyError(
                f"mosquitto not found at APPLIANCE_MOSQUITTO={override}: install it with "
                "'apt-get install mosquitto' or point the variable at the binary"
            )
        return override
    path = os.environ.get("PATH", "")
    found = shutil.which("mosquitto", path=os.pathsep.join([path, *SEARCH_DIRS]))
    if found is None:
        raise DependencyError(
            "mosquitto not found: install it with 'apt-get install mosquitto' "
            "(searched PATH and " + ", ".join(SEARCH_DIRS) + ")"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class Broker:
    """One mosquitto process with its config, ACL, database and log in ``workdir``."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, pki: Pki, *, port: int = 0,
                 central_users: tuple[str, ...] = ("central",),
                 autosave_interval_s: int = AUTOSAVE_INTERVAL_S) -> None:
        self.workdir = workdir
        self.pki = pki
        if not central_users:
            raise ValueError("a broker needs at least one central user")
        # One certificate per receiver or fleet tool, each its own client id. "central-*" covers
        # further receiver and fleet-tool certificates (the fleet CA never issues a box a CN
        # starting with "central").
        self.central_users = tuple(dict.fromkeys((*central_users, CENTRAL_PREFIX)))
        self.central_user = central_users[0]
        self.autosave_interval_s = autosave_interval_s
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self.conf_path = workdir / "mosquitto.conf"
        self.acl_path = workdir / "mosquitto.acl"
        self.log_path = workdir / "mosquitto.log"
        self.stderr_path = workdir / "mosquitto.stderr"
        self.data_dir = workdir / "data"

    @property
    def port(self) -> int:
        """The listening port (0 until :meth:`start` picked one)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_config(self, port: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        ensure_crl(self.pki)
        atomic_write(self.acl_path, render_acl(self.central_users).encode(), mode=0o644)
        shipped = render_config(
            port=port, host=self.host, ca=self.pki.ca_cert, cert=self.pki.server_cert,
            key=self.pki.server_key, crl=self.pki.crl, acl=self.acl_path, plugin=plugin_path(),
            central_users=self.central_users)
        lines = [
            "# Written by appliance.sync.broker; regenerated on every start.",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            f"autosave_interval {self.autosave_interval_s}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # Run as root: keep the current user instead of dropping to 'mosquitto', which could
            # not read our 0600 keys.
            lines.append(f"user {getpass.getuser()}")
        self.conf_path.write_text(shipped + "\n" + "\n".join(lines) + "\n")

    def start(self) -> int:
        """Start mosquitto, wait until it completes TLS handshakes, and return its port."""
        if self.running:
            return self._port
        binary = find_mosquitto()
        attempts = 3 if self._port == 0 else 1
        last_error: BrokerError | None = None
        for _ in range(attempts):
            port = self._port or free_port(self.host)
            try:
                self._launch(binary, port)
            except BrokerError as err:
                last_error = err
                continue
            self._port = port
            return port
        assert last_error is not None
        raise last_error

    def _launch(self, binary: str, port: int) -> None:
        self._write_config(port)
        with open(self.stderr_path, "ab") as err_file:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=err_file, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=owned_preexec(),  # dies with us
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerError(
                    f"mosquitto exited with code {code} on port {port}: {self._last_log_line()}"
                )
            if self._accepts_tls(port):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not accept TLS on {self.host}:{port} within "
                    f"{START_TIMEOUT_S:.0f} s: {self._last_log_line()}"
                )
            time.sleep(0.05)

    def _accepts_tls(self, port: int) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        cert, key = self.pki.client_cert(self.central_user), self.pki.client_key(self.central_user)
        if cert.exists() and key.exists():
            ctx.load_cert_chain(cert, key)
        try:
            with socket.create_connection((self.host, port), timeout=1.0) as raw, \
                    ctx.wrap_socket(raw, server_hostname=self.host):
                return True
        except ssl.SSLCertVerificationError as err:
            raise BrokerError(
                f"broker certificate on port {port} does not verify against {self.pki.ca_cert}: "
                f"{err.verify_message}"
            ) from err
        except ssl.SSLError:
            # The broker speaks TLS but refused our (missing) client certificate: it is up.
            return True
        except OSError:
            return False

    def _last_log_line(self) -> str:
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(OSError):
                lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
                if lines:
                    return lines[-1].strip()
        return "no log output"

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its database), then SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as in a crash: what was not autosaved is lost (for fault tests)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None

    def reload(self) -> None:
        """SIGHUP: mosquitto reloads its ACL, certificates and CRL (a revoked box is refused
        from its next connection on)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def restart(self) -> int:
        """Graceful stop and start on the same port."""
        self.stop()
        return self.start()
