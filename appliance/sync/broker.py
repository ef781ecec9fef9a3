"""The fleet broker: the shipped mosquitto configuration, and a private broker run from it.

The configuration ships with the package in ``appliance/sync/broker_conf/``: ``mosquitto.conf.in``
(mutual TLS; certificate CN = user name = client id; CRL), ``mosquitto.acl`` (each box confined
to its own subtree) and ``fleet_acl.c``, a small mosquitto plugin that refuses subscriptions a
box has no business making (anything outside its subtree, every ``$share/...`` filter).
:func:`render_config` fills in paths and port; the demo, the tests and the OS image all use it.

:class:`Broker` runs one mosquitto from that configuration for tests, the embedded demo and lab
setups, listening on loopback. Persistence is on, so QoS 1 messages queued for persistent
sessions survive a graceful restart (and, up to the autosave interval, a SIGKILL).

Everything the broker writes (config, ACL, database, log) stays in ``workdir``; the compiled
plugin is cached per user (``$XDG_CACHE_HOME/line-recorder``), keyed by its source's hash.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType

from appliance.durable import atomic_write
from appliance.errors import ApplianceError, DependencyError
from appliance.pki import Pki, ensure_crl
from appliance.sync.protocol import TOPIC_ROOT

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
AUTOSAVE_INTERVAL_S = 5
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
CONF_DIR = Path(__file__).parent / "broker_conf"
CONF_TEMPLATE = CONF_DIR / "mosquitto.conf.in"
ACL_FILE = CONF_DIR / "mosquitto.acl"
PLUGIN_SOURCE = CONF_DIR / "fleet_acl.c"
PLUGIN_ENV = "APPLIANCE_FLEET_ACL_PLUGIN"
CENTRAL_PREFIX = "central-*"


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


def plugin_path() -> Path:
    """The compiled ``fleet_acl`` plugin: ``$APPLIANCE_FLEET_ACL_PLUGIN``, or built once from
    the shipped source with the C compiler and mosquitto's plugin headers, cached per user."""
    override = os.environ.get(PLUGIN_ENV)
    if override:
        if not os.path.isfile(override):
            raise DependencyError(f"{PLUGIN_ENV}={override} does not exist (the compiled "
                                  f"fleet_acl plugin, a .so file)")
        return Path(override)
    source = PLUGIN_SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "line-recorder"
    target = cache / f"fleet_acl-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise DependencyError("cannot build the broker's fleet_acl plugin: no C compiler "
                              "(apt-get install gcc mosquitto-dev libmosquitto-dev)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{target.name}.{os.getpid()}.tmp"
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(PLUGIN_SOURCE)],
        capture_output=True, text=True, check=False)
    if built.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (built.stderr.strip().splitlines() or ["no output"])[0]
        raise DependencyError(f"cannot build the broker's fleet_acl plugin ({first}): install "
                              f"mosquitto-dev and libmosquitto-dev")
    os.replace(tmp, target)  # a cache: rebuilt when missing, so no fsync is needed
    return target


def render_acl(central_users: tuple[str, ...]) -> str:
    """The shipped ACL, with a ``user`` block for every named central user beyond ``central``
    (prefixes such as ``central-*`` are granted by the fleet_acl plugin)."""
    text = ACL_FILE.read_text()
    for user in central_users:
        if not user.endswith("*") and f"\nuser {user}\n" not in text:
            text += f"\nuser {user}\ntopic readwrite {TOPIC_ROOT}/#\n"
    return text


def render_config(*, port: int, host: str, ca: Path, cert: Path, key: Path, crl: Path,
                  acl: Path, plugin: Path, central_users: tuple[str, ...]) -> str:
    """The shipped ``mosquitto.conf.in`` with its placeholders filled in."""
    values = {
        "PORT": str(port), "HOST": host, "CA_FILE": str(ca), "CERT_FILE": str(cert),
        "KEY_FILE": str(key), "CRL_FILE": str(crl), "ACL_FILE": str(acl),
        "PLUGIN": str(plugin), "TOPIC_ROOT": TOPIC_ROOT, "CENTRAL_USERS": ",".join(central_users),
    }
    text = CONF_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


class Broker:
    """One mosquitto process with its config, ACL, database and log in ``workdir``."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, pki: Pki, *, port: int = 0, central_user: str = "central",
                 autosave_interval_s: int = AUTOSAVE_INTERVAL_S,
                 central_users: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.pki = pki
        self.central_user = central_user
        # Certificate CNs with central's rights; "central-*" covers every further receiver and
        # fleet-tool certificate (the fleet CA never issues a box a CN starting with "central").
        extra = [u for u in (*central_users, CENTRAL_PREFIX) if u != central_user]
        self.central_users = (central_user, *dict.fromkeys(extra))
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
                start_new_session=True,
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
