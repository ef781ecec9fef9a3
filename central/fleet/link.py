"""How central's fleet tools reach the broker: address, trust anchor and a client certificate.

The address comes from ``--broker HOST:PORT`` or ``[broker] host/port`` of central.toml; the
broker's certificate is checked against ``[broker] ca`` or the fleet CA. Each tool connects with
a certificate of its own, issued on the spot by the fleet CA with a CN ``central-<role>-<random>``
(the broker gives every ``central-*`` certificate central's rights and makes the CN the client
id, so two tools never take each other's session). The key lives in a private temporary folder
and is deleted when the tool exits; the certificate is short-lived (minutes: the tool's own
timeout plus :data:`TOOL_CERT_S`; ``fleet serve`` renews its own), so none outlives its use.
"""

from __future__ import annotations

import datetime as dt
import secrets
import ssl
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from central.fleet.registry import Fleet
from linerec_contract.durable import atomic_write
from linerec_contract.errors import ConfigError, UsageError
from linerec_contract.pki import key_pem, new_tls_key, sign_request
from linerec_contract.tls import tls_context

# Operator certificates are short-lived, not revoked: a one-shot tool's lives its own timeout plus
# TOOL_CERT_S; fleet serve's lives SERVE_CERT_S and is renewed at half of it for reconnections.
BACKDATE = dt.timedelta(minutes=2)
TOOL_CERT_S = 300.0
SERVE_CERT_S = 900.0
SERVICE_CN = "central-fleet"  # fleet serve's fixed name: one broker session across restarts


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int


def parse_address(text: str) -> BrokerAddress:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--broker {text!r} must be HOST:PORT with a port 1..65535")
    return BrokerAddress(host, int(port))


def broker_address(fleet: Fleet, override: str | None) -> BrokerAddress:
    if override:
        return parse_address(override)
    cfg = fleet.home.config()
    if cfg.host is None or cfg.port is None:
        raise ConfigError(f"the broker address is not set: pass --broker HOST:PORT or set "
                          f"broker.host and broker.port in {fleet.home.config_path}")
    return BrokerAddress(cfg.host, cfg.port)


class OperatorCert:
    """A short-lived ``central-<role>-<random>`` client certificate in a private folder, loaded
    in one TLS context. It lives ``lifetime_s`` (from :data:`BACKDATE` before now, for clocks a
    little apart) and is never revoked: it expires. :meth:`renew` puts a fresh one in the same
    context, for a long-running tool's next reconnection."""

    def __init__(self, fleet: Fleet, role: str, lifetime_s: float, folder: Path,
                 cn: str | None = None) -> None:
        pki = fleet.pki
        if not pki.ca_key.is_file():
            raise ConfigError(f"{pki.dir} holds no fleet CA yet: enrol a box first "
                              f"(appliance-central fleet enroll REQUEST)")
        if lifetime_s <= 0:
            raise UsageError(f"operator certificate lifetime {lifetime_s} s must be positive")
        self.fleet, self.role, self.lifetime_s = fleet, role, lifetime_s
        self.cert_path, self.key_path = folder / "client.crt", folder / "client.key"
        self.expires_at = 0.0
        self.fixed_cn = cn
        self.cn = ""
        self._mint()
        self.context = tls_context(ssl.Purpose.SERVER_AUTH, Path(fleet.home.config().ca or
                                                                 pki.ca_cert),
                                   self.cert_path, self.key_path, what="fleet tool")

    def _mint(self) -> None:
        key = new_tls_key()
        self.cn = self.fixed_cn or f"central-{self.role}-{secrets.token_hex(4)}"
        cert = sign_request(self.fleet.pki, self.cn, key.public_key(),
                            valid_for=dt.timedelta(seconds=self.lifetime_s), backdate=BACKDATE)
        atomic_write(self.key_path, key_pem(key), mode=0o600)
        atomic_write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self.expires_at = cert.not_valid_after_utc.timestamp()

    def due(self, now: float | None = None) -> bool:
        """True once less than half the lifetime is left."""
        now = time.time() if now is None else now
        return self.expires_at - now < self.lifetime_s / 2

    def renew(self) -> None:
        self._mint()
        self.context.load_cert_chain(self.cert_path, self.key_path)


@contextmanager
def operator_cert(fleet: Fleet, role: str, lifetime_s: float,
                  cn: str | None = None) -> Iterator[OperatorCert]:
    """An :class:`OperatorCert` (``cn``: a fixed name, for a tool that keeps a broker session
    across its restarts); its key is deleted when the tool is done."""
    with tempfile.TemporaryDirectory(prefix="fleet-tls-") as tmp:
        yield OperatorCert(fleet, role, lifetime_s, Path(tmp), cn)


@contextmanager
def operator_tls(fleet: Fleet, role: str,
                 lifetime_s: float = TOOL_CERT_S) -> Iterator[ssl.SSLContext]:
    """A client TLS context with a fresh ``central-<role>-<random>`` certificate that expires
    after ``lifetime_s`` (give a tool its own timeout plus :data:`TOOL_CERT_S`)."""
    with operator_cert(fleet, role, lifetime_s) as cert:
        yield cert.context
